"""Keep freed host memory in the process while PyTorch trains on the CPU.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and trims the top of its heap back to
the kernel as soon as 128 KiB there are free. A MobileNetV2 training step at 224x224 and batch 32
allocates and frees activations and gradients of tens of MiB each, so every step maps them again and
the kernel zero-fills every page on first touch: on the 2-core benchmark machine that was most of the
step (``benchmarks/results/train_throughput_cpu.md``, images/s with glibc's defaults -> with the heap
kept: head only 46.6 -> 178.9, last third unfrozen 51.0 -> 116.9, whole backbone 40.6 -> 52.2;
peak resident memory 3,907 -> 4,073 MiB).
The usual cure is another allocator (jemalloc, tcmalloc) preloaded with ``LD_PRELOAD``; the same
effect needs no dependency: ``mallopt`` tells glibc to take large blocks from its heap as well
(``M_MMAP_MAX`` 0) and to keep freed memory there (a high ``M_TRIM_THRESHOLD``), so that after the
first step the same pages are reused. :func:`retained_heap` does that for the
duration of a training loop and restores glibc's defaults after it, handing the free memory back
(``malloc_trim``). Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# mallopt(3) parameters and glibc's defaults for them
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_UP_TO = 2**31 - 1  # bytes of free heap top kept (mallopt takes a C int)


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, glibc keeps freed memory for reuse instead of unmapping it.

    Yields whether the setting took effect. Memory freed inside the block stays with the process until
    it ends; then glibc's defaults come back and the free memory is returned to the kernel.
    """
    libc = glibc() if enabled else None
    applied = False
    if libc is not None:
        applied = libc.mallopt(M_MMAP_MAX, 0) == 1
        if applied and libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO) != 1:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            applied = False
    if applied:
        log.debug("glibc keeps freed memory during training (M_MMAP_MAX 0, M_TRIM_THRESHOLD %d)", KEEP_UP_TO)
    try:
        yield applied
    finally:
        if applied:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
