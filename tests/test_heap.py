"""Freed heap memory goes back to the system between pack units (glibc), so a pack's resident
size follows its live data, not the fragmentation its varying temporaries leave."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from tallstore.heap import release_free_memory


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc heap")
def test_free_pages_between_live_blocks_are_returned_to_the_system() -> None:
    big = np.ones(8 << 20, np.uint8)
    del big  # freeing an mmapped block raises glibc's mmap threshold past 1 MiB
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(160)]  # now on the heap
    live = blocks[1::2]  # every other block stays: the freed ones are holes, not the heap's top
    del blocks
    before = _rss_anon_mib()
    assert release_free_memory()
    after = _rss_anon_mib()
    assert before - after >= 40, (before, after)
    assert all(b[0] == 1 for b in live)
    assert not release_free_memory(min_interval=60.0)  # a pack trims at most once per interval
