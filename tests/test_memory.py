"""Per-phase peak memory: a new window forgets an earlier, larger peak."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sim.memory import peak_rss_mb, reset_peak


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
