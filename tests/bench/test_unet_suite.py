"""`vgrt bench unet --quick` on the tiny preset: samples and a ratio to PyTorch eager for every backend, each
turn a child process of its own with its peak memory."""

import pytest

from tests.bench.helpers import results_by_backend, run_bench

COMPETITORS = ("torch", "torch-bf16", "onnxruntime", "openvino", "openvino-dynamic")


@pytest.fixture(scope="module")
def unet_run(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-unet")
    return run_bench(
        "unet",
        "--quick",
        "--backends",
        ",".join(COMPETITORS),
        "--export-dir",
        str(tiny_export()),
        out=out,
    )


def test_every_backend_has_samples_and_a_ratio(unet_run):
    run, _, _ = unet_run
    (case,) = run["cases"]
    assert case["params"] == {"preset": "tiny", "batch": 2, "latent": "16x16", "features": "none", "dtype": "fp32"}
    by_backend = results_by_backend(run)
    assert set(by_backend) == set(COMPETITORS)
    repeats = run["settings"]["timing"]["repeats"]
    baseline = run["details"]["child_baseline_rss_bytes"]
    for (result,) in by_backend.values():
        assert len(result["samples_s"]) == len(result["peak_rss_bytes"]) == repeats  # a child per sample
        assert all(s > 0 for s in result["samples_s"]) and result["ratio_to_torch"] > 0
        assert all(peak > baseline > 100 * 2**20 for peak in result["peak_rss_bytes"])  # torch alone is more
    assert by_backend["onnxruntime"][0]["max_abs_diff"] < 1e-4  # the same model ran on all of them
    assert by_backend["openvino"][0]["relative_error"] < 1e-5  # static shapes
    assert by_backend["openvino-dynamic"][0]["relative_error"] < 1e-5
    assert 1e-4 < by_backend["torch-bf16"][0]["relative_error"] < 0.1  # autocast really ran in bf16


def test_rounds_rotate_the_children_and_record_their_opening(unet_run):
    run, _, _ = unet_run
    children = run["details"]["children"]
    (rounds,) = children["round_order"].values()
    first, second = ([name.rsplit(" ", 1)[1] for name in order] for order in rounds)
    assert first == list(COMPETITORS) and second == [*first[1:], first[0]]
    (opened,) = children["open_s"].values()
    assert set(opened) == set(first) and all(len(s) == 2 and min(s) > 0 for s in opened.values())


def test_the_run_records_its_context(unet_run):
    run, stdout, png = unet_run
    from vgrt.engines.cpu_features import read_cpu_features

    assert run["machine"]["logical_cores"] >= 1 and run["machine"]["ram_bytes"] > 0
    assert run["machine"]["cpu_units"] == read_cpu_features().describe()  # which precisions had matrix units
    assert {"torch", "onnxruntime", "vgrt"} <= set(run["versions"])
    assert run["memory"]["peak_rss_bytes"] > 0
    assert run["details"]["exports"][0]["reused"]
    assert png.stat().st_size > 0 and png.name.startswith("unet-tiny-")
    assert "| preset | batch | latent | features | dtype | competitor | median | p90 | vs torch |" in stdout
