"""Child processes that die with their parent.

edgetl runs TensorFlow, onnx2tf, Vela, TFLite Micro and torchrun in child processes. If the parent is
killed (``kill PID``, an OOM kill, a CI job's timeout), those children must not go on writing into the
run folder. On Linux each child asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), set between fork and exec; elsewhere this is a no-op.

Pass ``preexec_fn=die_with_parent()`` to ``subprocess.run`` or ``Popen`` (called in the parent), or use
:func:`run_child`, which also holds Ctrl-C back while it forks: a SIGINT that lands in the fork makes
Python raise KeyboardInterrupt inside an at-fork hook (logging's ``_releaseLock``), where it is printed as
"Exception ignored" and lost, and the command would go on as if nothing was pressed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

PR_SET_PDEATHSIG = 1


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved in the parent: the child only makes the call


def die_with_parent(parent: int | None = None):
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` (this process) exits, and hear
    Ctrl-C even if :func:`sigint_held` blocked it in the parent (a signal mask survives exec)."""
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        if _PRCTL is None:
            return
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(1)

    return preexec if _PRCTL is not None or hasattr(signal, "pthread_sigmask") else None


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Block SIGINT in this (main) thread for the block; a Ctrl-C pressed meanwhile is raised as
    KeyboardInterrupt when the block ends, in ordinary code."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_child(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, **kwargs)`` for a child that dies with this process, started with
    Ctrl-C held back (see the module docstring); an interrupt while it runs kills it and is re-raised."""
    proc = None
    try:
        with sigint_held():
            proc = subprocess.Popen(command, preexec_fn=die_with_parent(), **kwargs)
        stdout, stderr = proc.communicate()
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
