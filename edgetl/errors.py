"""One exception family for everything a user can get wrong, and the exit codes scripts branch on.

The CLI catches :class:`EdgetlError` once, prints ``error: <message>`` and the hint on one line each,
and exits with the error's code. Library code raises; it never prints or exits.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator


class ExitCode(enum.IntEnum):
    """Process exit codes. Documented in the README; values never change once released."""

    OK = 0
    ERROR = 1  # anything else that went wrong (bad data, bad weights, I/O)
    USAGE = 2  # bad command line (click's own code for usage errors)
    PARITY_FAILED = 3  # an exported model does not match the float model
    CONSTRAINT_VIOLATED = 4  # a model does not fit the target's limits
    MISSING_DEPENDENCY = 5  # an optional extra is not installed
    VERIFY_FAILED = 6  # a bundle's files do not match its manifest
    ACCELERATOR_FALLBACK = 7  # an accelerator compiler left operations on the CPU
    INTERRUPTED = 130  # Ctrl-C; the run can be resumed


class EdgetlError(Exception):
    """A failure with a message a user can act on.

    Args:
        message: what went wrong, one line.
        hint: what to do about it, one line (optional).
    """

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class DataError(EdgetlError):
    """The dataset cannot be used as given."""


class WeightsError(EdgetlError):
    """Initial weights cannot be resolved or do not fit the model."""


class ConfigError(EdgetlError):
    """A configuration value or file is invalid."""

    exit_code = ExitCode.USAGE


class RunDirError(EdgetlError):
    """A run directory is missing, incomplete or inconsistent with the request."""


class MissingDependencyError(EdgetlError):
    """An optional dependency is not installed; the hint names the extra."""

    exit_code = ExitCode.MISSING_DEPENDENCY


class OpsOnCPU(EdgetlError):
    """An accelerator's compiler left operations on the CPU (beyond what the target allows)."""

    exit_code = ExitCode.ACCELERATOR_FALLBACK


class ExportError(EdgetlError):
    """A conversion failed or produced a model that does not match what it claims to be."""


class ParityRefused(EdgetlError):
    """``package``: the artifact failed parity, or its verdict rests on too little evidence."""

    exit_code = ExitCode.PARITY_FAILED


class ConstraintViolated(EdgetlError):
    """A model breaks a target's limits (size, input, arena, flash)."""

    exit_code = ExitCode.CONSTRAINT_VIOLATED


class TFLMUnsupported(EdgetlError):
    """TFLite Micro cannot run the model (an op without a kernel, or no arena fits)."""

    exit_code = ExitCode.CONSTRAINT_VIOLATED


class CompilerFailed(EdgetlError):
    """edgetpu_compiler ran and failed."""


class VelaFailed(EdgetlError):
    """Vela ran and did not produce a model."""


class Interrupted(EdgetlError):
    """The user pressed Ctrl-C; state was saved and the run can be resumed."""

    exit_code = ExitCode.INTERRUPTED


class RunLocked(EdgetlError):
    """Another edgetl process is writing the same run or bundle folder."""


class TrainingDiverged(EdgetlError):
    """The loss became non-finite; the last good state is kept."""


# Set by the CLI's SIGINT handler (edgetl.cli.edge) before Python raises KeyboardInterrupt. Python can
# swallow that exception (raised inside an at-fork hook, a __del__, a C extension's init: "Exception
# ignored in ..."), so code that publishes a result asks :func:`raise_if_interrupted` first.
SIGINT_SEEN = [False]


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed in this command, even if that interrupt was lost:
    called before a result is published (:func:`edgetl.rundir.atomic_path`, the export's install) and
    when a child process returns, so a lost Ctrl-C still stops the command with nothing new trusted."""
    if SIGINT_SEEN[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def writing_into(where: str | os.PathLike) -> Iterator[None]:
    """An OSError without a path (a full disk while a library writes a file it opened: ``[Errno 28] No
    space left on device``) gets ``where`` as its path, so the one-line error says which disk is full."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(where)
        raise


def first_line(exc: BaseException) -> str:
    """An exception as one line: its first non-empty line, or its type's name when it says nothing."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def os_error_message(exc: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` as ``no space left on device: x`` (one line)."""
    import errno
    import os

    reason = exc.strerror or first_line(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    where = exc.filename if exc.filename is not None else ""
    where = os.fsdecode(where) if isinstance(where, bytes) else str(where)
    return f"{reason[:1].lower()}{reason[1:]}" + (f": {where}" if where else "")


def require(module: str, extra: str, *, import_it: bool = True):
    """Import an optional dependency (or, with ``import_it=False``, only check that it is installed)
    or raise :class:`MissingDependencyError` naming the extra."""
    import importlib
    import importlib.util

    try:
        if not import_it:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"No module named {module!r}")
            return None
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed ({exc})",
            hint=f'pip install "edgetl[{extra}]"',
        ) from None
