"""`vgrt bench export --quick`: the tiny export timed in a child process, with its peak memory."""

import pytest

from tests.bench.helpers import run_bench


@pytest.mark.slow  # a minute on a 2-core CPU: it times a whole export, which no other test can share
def test_export_time_and_peak_memory(tmp_path):
    run, stdout, png = run_bench("export", "--quick", out=tmp_path)
    (case,) = run["cases"]
    (result,) = case["results"]
    assert case["params"] == {"preset": "tiny", "features": "none", "dtype": "fp32"}
    assert len(result["samples_s"]) == 1 and result["samples_s"][0] > 0
    assert result["peak_rss_bytes"][0] > 100 * 2**20  # torch alone is more than that
    assert result["ratio_to_torch"] is None
    assert "peak RSS" in stdout and png.exists()
