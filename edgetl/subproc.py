"""Child processes that die with their parent.

edgetl runs TensorFlow, onnx2tf, Vela, TFLite Micro and torchrun in child processes. If the parent is
killed (``kill PID``, an OOM kill, a CI job's timeout), those children must not go on writing into the
run folder. On Linux each child asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), set between fork and exec; elsewhere this is a no-op.

Pass ``preexec_fn=die_with_parent()`` to ``subprocess.run`` or ``Popen`` (called in the parent).
"""

from __future__ import annotations

import os
import signal
import sys

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
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` (this process) exits."""
    parent = os.getpid() if parent is None else parent

    def preexec() -> None:
        if _PRCTL is None:
            return
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(1)

    return preexec if _PRCTL is not None else None
