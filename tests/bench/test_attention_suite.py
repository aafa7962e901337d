"""`vgrt bench attention --quick`: every implementation timed at every size and density, all agreeing."""

import pytest
import torch

from tests.bench.helpers import results_by_backend, run_bench
from vgrt.bench.attention_suite import AttentionShape, region_mask


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    return run_bench(
        "attention", "--quick", "--backends", "torch,onnxruntime", out=tmp_path_factory.mktemp("bench-attention")
    )


def test_every_implementation_has_samples_a_ratio_and_the_reference_result(attention_run):
    run, stdout, png = attention_run
    assert {c["params"]["density"] for c in run["cases"]} == {"dense", 0.5}
    assert {c["params"]["kind"] for c in run["cases"]} == {"self", "cross"}
    assert set(results_by_backend(run)) == {"torch", "onnxruntime"}
    for case in run["cases"]:
        names = {r["competitor"] for r in case["results"]}
        if case["params"]["density"] == "dense":
            assert names == {"torch", "onnxruntime-attention"}
        else:
            assert names == {
                "torch",
                "torch-sdpa-bool",
                "onnxruntime-custom",
                "onnxruntime-attention",
                "onnxruntime-decomposed",
            }
        for result in case["results"]:
            assert len(result["samples_s"]) == 2 and result["ratio_to_torch"] > 0
            assert result["max_abs_diff"] is None or result["max_abs_diff"] < 1e-4
    assert png.name.startswith("attention-tiny-") and "| onnxruntime-custom |" in stdout


def test_region_mask_has_the_density_asked_for():
    shape = AttentionShape("tiny", 0, "self", batch=2, heads=1, queries=64, keys=40, head_dim=8)
    mask = region_mask(shape, 0.25, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 1, 64, 40)
    assert (mask.sum(-1) == 10).all()  # every query attends a quarter of the keys
