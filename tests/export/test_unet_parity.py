"""ONNX Runtime runs every exported feature set exactly like the PyTorch reference."""

import pytest
import torch

from vgrt.engines import open_runner
from vgrt.export import example_feed
from vgrt.export.manifest import read_manifest

FEATURE_SETS = ["none", "key_mask", "extra_tokens", "extra_tokens,kv_source", "extra_tokens,regions", "mutual", "all"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def outputs(directory, feed):
    with (
        open_runner(directory, backend="torch") as torch_runner,
        open_runner(directory, backend="onnxruntime") as ort_runner,
    ):
        return torch_runner.infer(feed)["noise_pred"], ort_runner.infer(feed)["noise_pred"]


@pytest.mark.parametrize("features", FEATURE_SETS)
def test_onnxruntime_matches_torch_fp32(tiny_export, features):
    directory = tiny_export(features=features)
    for seed in (101, 202):  # fresh inputs, not the ones the graph was traced with
        expected, got = outputs(directory, example_feed(directory, seed=seed))
        assert relative_error(got, expected) <= 1e-4


@pytest.mark.parametrize("form", ["attention", "decomposed"])
def test_other_attention_forms_match_torch(tiny_export, form):
    directory = tiny_export(features="all", attention_form=form)
    manifest = read_manifest(directory).data
    assert manifest["components"]["unet"]["attention_form"] == form
    expected, got = outputs(directory, example_feed(directory, seed=303))
    assert relative_error(got, expected) <= 1e-4


def test_parity_at_other_shapes_in_the_profile(tiny_export):
    from vgrt.export.feeds import random_feed

    directory = tiny_export(features="all")
    spec = read_manifest(directory).component("unet").spec
    sizes = {
        **spec.profile_sizes("min"),
        "batch": 3,
        "height": 24,
        "width": 8,
        "context": 5,
        "extra": 3,
        "regions": 3,
        "groups": 1,
        "mutual_rows": 2,
    }
    expected, got = outputs(directory, random_feed(spec, sizes, seed=404))
    assert got.shape == (3, 4, 24, 8)
    assert relative_error(got, expected) <= 1e-4


def test_fp16_export_runs_within_fp16_tolerance(tiny_export):
    from vgrt.models.rebuild import module_from_manifest

    directory = tiny_export(features="all", dtype="fp16")
    manifest = read_manifest(directory)
    unet = manifest.component("unet")
    assert "MaskedAttention" in unet.fp32_ops and "GroupNormalization" in unet.fp32_ops
    feed = example_feed(directory, seed=505)
    assert feed["sample"].dtype == torch.float16
    module, _ = module_from_manifest(manifest)
    with torch.no_grad():
        expected = module(**{k: v.float() if v.is_floating_point() else v for k, v in feed.items()})
    with open_runner(directory, backend="onnxruntime") as runner:
        got = runner.infer(feed)["noise_pred"]
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert relative_error(got, expected) <= 1e-2


def test_plain_export_has_no_conditioning_cost(tiny_export):
    import onnx

    directory = tiny_export(features="none")
    model = onnx.load(directory / "unet.onnx")
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    ops = {n.op_type for n in model.graph.node}
    assert "MaskedAttention" not in ops and "Gather" not in ops and "AveragePool" not in ops


def test_session_settings_are_applied_and_keep_parity(tiny_export):
    directory = tiny_export(features="all")
    feed = example_feed(directory, seed=404)
    results = {}
    for flush in (True, False):
        with open_runner(directory, backend="onnxruntime", denormals_as_zero=flush, memory_arena=flush) as runner:
            options = runner.session.get_session_options()
            assert options.get_session_config_entry("session.set_denormal_as_zero") == str(int(flush))
            assert options.enable_cpu_mem_arena == flush
            results[flush] = runner.infer(feed)["noise_pred"]
    assert relative_error(results[True], results[False]) <= 1e-6
