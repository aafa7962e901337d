"""Peak memory of a benchmark window: the resident peak, and its anonymous part (not mapped files' pages)."""

import mmap
import sys

import numpy as np
import pytest

from vgrt.bench.machine import peak_rss_window

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")
MB = 1 << 20


def test_memory_written_counts_in_both_peaks():
    with peak_rss_window() as peak:
        block = np.ones(256 * MB, dtype=np.uint8)  # written: resident and anonymous
        del block
    assert peak["peak_anon_bytes"] >= 256 * MB
    assert peak["peak_rss_bytes"] >= peak["peak_anon_bytes"]


def test_a_mapped_file_read_counts_as_resident_not_anonymous(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\1" * (256 * MB))
    with peak_rss_window() as peak, open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE)) == len(mapped) // mmap.PAGESIZE
    with peak_rss_window() as baseline:
        pass
    assert peak["peak_rss_bytes"] - baseline["peak_rss_bytes"] >= 200 * MB  # the file's pages were resident
    assert peak["peak_anon_bytes"] - baseline["peak_anon_bytes"] < 64 * MB  # and none of them anonymous
