"""Per-phase peak memory: a new window forgets an earlier, larger peak."""

from __future__ import annotations

import sys

import numpy as np
import psutil
import pytest

from sim.memory import peak_rss_mb, release_free_heap, reset_peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resettable peaks are a Linux kernel feature")
def test_peak_window_sees_its_own_allocation_and_forgets_older_ones():
    reset_peak()
    before = peak_rss_mb()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    during = peak_rss_mb()
    del block
    reset_peak()
    after = peak_rss_mb()
    assert during - before > 250
    assert during - after > 250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_but_resident_heap_goes_back_to_the_os():
    """A fragmented heap (freed blocks between live ones) stays resident until trimmed."""
    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    blocks = [bytearray(4096) for _ in range(50_000)]  # ~200 MiB of malloc'd blocks
    keep = blocks[::16]  # every 16th stays alive, pinning the heap around the freed ones
    del blocks
    before = rss()
    release_free_heap()
    assert before - rss() > 100  # MiB
    assert len(keep) == 3125
