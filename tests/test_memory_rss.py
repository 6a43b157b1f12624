"""memory.reset_peak_rss: the peak resident memory starts afresh, so a phase's own peak can be read apart."""

from __future__ import annotations

import sys

import pytest

from gisp_fx.memory import peak_rss_mb, reset_peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux's")
def test_reset_peak_rss_forgets_an_earlier_peak():
    import numpy as np

    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    high = peak_rss_mb()
    del big
    assert reset_peak_rss()
    small = np.ones(8 * 2**20 // 8)
    assert peak_rss_mb() < high - 32 and small.sum() > 0
