"""The command line's edge: every failure becomes one ``edgetl: error:`` line and an exit code,
option types that refuse non-finite numbers, and logging to stderr."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import click

from edgetl.errors import SIGINT_SEEN, EdgetlError, ExitCode


def one_line(text: str) -> str:
    """Control characters (a newline in a folder name, say) shown escaped: an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _watch_sigint() -> Any:
    """Note every Ctrl-C before Python's own handler raises KeyboardInterrupt (a C extension being
    imported may turn that into another exception); returns the handler to restore, or None."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None

    def on_sigint(signum: int, frame: Any) -> None:
        SIGINT_SEEN[0] = True
        signal.default_int_handler(signum, frame)

    SIGINT_SEEN[0] = False
    signal.signal(signal.SIGINT, on_sigint)
    _UNRAISABLE_HOOK[0] = sys.unraisablehook
    sys.unraisablehook = _interrupt_again
    return previous


_UNRAISABLE_HOOK: list[Any] = [None]  # the hook _watch_sigint replaced


def _interrupt_again(unraisable: Any) -> None:
    """A Ctrl-C that landed in a callback Python cannot raise from (a weakref or garbage-collector
    callback, e.g. inside the import machinery) is not printed as "Exception ignored … Traceback": it is
    delivered again, a moment later, to the main thread's own code. Anything else goes to the usual hook."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread
        import threading

        threading.Timer(0.01, _thread.interrupt_main).start()
        return
    (_UNRAISABLE_HOOK[0] or sys.__unraisablehook__)(unraisable)


def _leave_interrupted() -> None:
    """End an interrupted command with exit 130 now, its output flushed, without Python's shutdown.

    Python kills itself with SIGINT at exit (status -2, not 130) when it believes a KeyboardInterrupt
    went unhandled. That happened once in about 50 runs of tests/test_faults_signals.py after edgetl had
    handled the interrupt and printed its error line (what left that belief behind was not pinned down).
    Nothing is left to do here: files are published atomically or not at all, the run's lock is the
    kernel's, child processes die with this one.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(ExitCode.INTERRUPTED))


class EdgetlGroup(click.Group):
    """Click group that turns every failure into one ``edgetl: error:`` line and an exit code.

    Library errors (:class:`EdgetlError`) carry their own code; usage errors exit 2; an OS error (a
    read-only folder, a full disk) exits 1 with the path; anything unexpected exits 1 and asks for
    ``--traceback``. With ``--json`` the command also prints ``{"error": {...}}`` on stdout, so a
    script that parses stdout always gets one object.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        self._wants_json = "--json" in argv
        previous = _watch_sigint()
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # bad options, missing arguments, unknown commands
            hint = "see --help" if isinstance(exc, click.UsageError) else None
            code = self._fail(exc.format_message(), hint, exc.exit_code)
        except click.Abort:  # Ctrl-C while click itself was reading input
            code = self._fail("interrupted", None, int(ExitCode.INTERRUPTED))
        finally:
            if previous is not None:
                import signal

                signal.signal(signal.SIGINT, previous)
                sys.unraisablehook = _UNRAISABLE_HOOK[0] or sys.__unraisablehook__
                SIGINT_SEEN[0] = False  # the flag is about this command (a library caller goes on)
        if code == ExitCode.INTERRUPTED and args is None:
            _leave_interrupted()
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            if SIGINT_SEEN[0]:  # a Ctrl-C that Python swallowed, then a normal exit
                ctx.exit(self._fail("interrupted", None, int(ExitCode.INTERRUPTED)))
            raise
        except EdgetlError as exc:
            self._reraise_if_asked(ctx)
            ctx.exit(self._fail(exc.message, exc.hint, int(exc.exit_code)))
        except KeyboardInterrupt:
            ctx.exit(self._fail("interrupted", None, int(ExitCode.INTERRUPTED)))
        except OSError as exc:  # a read-only or full disk, a folder that vanished: say which path
            from edgetl.errors import os_error_message

            self._reraise_if_asked(ctx)
            ctx.exit(self._fail(os_error_message(exc), None, int(ExitCode.ERROR)))
        except Exception as exc:  # a bug: still one line, and how to see more
            from edgetl.errors import first_line

            if SIGINT_SEEN[0]:  # Ctrl-C in an extension's import becomes "ImportError: initialization failed"
                ctx.exit(self._fail("interrupted", None, int(ExitCode.INTERRUPTED)))
            self._reraise_if_asked(ctx)
            message = f"internal error: {type(exc).__name__}: {first_line(exc)}"
            ctx.exit(self._fail(message, "re-run with --traceback and report it", int(ExitCode.ERROR)))
        if SIGINT_SEEN[0]:  # the command finished although Ctrl-C was pressed (Python lost the interrupt)
            ctx.exit(self._fail("interrupted", None, int(ExitCode.INTERRUPTED)))
        return result

    @staticmethod
    def _reraise_if_asked(ctx: click.Context) -> None:
        if (ctx.obj or {}).get("traceback"):
            raise

    def _fail(self, message: str, hint: str | None, code: int) -> int:
        message = one_line(message)
        hint_text = f" (hint: {one_line(hint)})" if hint else ""
        if getattr(self, "_wants_json", False):
            error = {"message": message, "hint": hint, "exit_code": code}
            click.echo(json.dumps({"ok": False, "error": error}, sort_keys=True))
        click.echo(f"edgetl: error: {message}{hint_text}", err=True)
        return code


class Finite(click.FloatRange):
    """A float option that must be a finite number (``inf`` and ``nan`` are usage errors), in range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = Finite(min=0, min_open=True)
NON_NEGATIVE = Finite(min=0)
FRACTION = Finite(min=0, max=1)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgetl: %(levelname)s: %(message)s"))
    root = logging.getLogger("edgetl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not verbose:
        # Conversion and framework chatter stays out of the terminal unless -v.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        for name in ("tensorflow", "absl", "onnx2tf", "h5py"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _use_cache_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--cache-dir``: this process and the processes it starts (torchrun's ranks) use that cache."""
    if value:
        from edgetl.data.cache import CACHE_ENV

        os.environ[CACHE_ENV] = os.path.abspath(os.path.expanduser(value))


cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=str), default=None, expose_value=False,
    callback=_use_cache_dir, help="Decoded-image cache folder [$EDGETL_CACHE_DIR or ~/.cache/edgetl/images].",
)  # fmt: skip


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``NAME VALUE`` / ``NAME=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out
