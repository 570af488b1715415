"""edgetl.train.cpu_heap: inside retained_heap, freed blocks are reused instead of being mapped afresh."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from edgetl.train.cpu_heap import glibc, retained_heap

pytestmark = pytest.mark.skipif(glibc() is None, reason="needs glibc (mallopt)")


def _page_faults(size: int = 64 << 20, rounds: int = 4) -> int:
    """Minor page faults while allocating, touching and freeing a large block ``rounds`` times."""
    block = np.ones(size, np.uint8)  # first touch: faults whatever the setting
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = np.ones(size, np.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_retained_heap_reuses_freed_memory_then_restores_defaults():
    default = _page_faults()
    assert default > 100  # glibc unmaps a 64 MiB block on free and the kernel faults it in again
    with retained_heap() as applied:
        assert applied is True
        kept = _page_faults()
    assert kept < default / 10
    assert _page_faults() > default / 2  # glibc's defaults are back after the block


def test_retained_heap_disabled_changes_nothing():
    with retained_heap(enabled=False) as applied:
        assert applied is False
        assert _page_faults() > 100
