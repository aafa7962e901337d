"""OpenVINO runs every exported feature set and encoder like the PyTorch reference; its settings (precision,
threads, static shapes, cache folder) reach OpenVINO, and a second open reuses the compiled model."""

import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tests.export.test_components import ENCODERS
from tests.export.test_unet_parity import FEATURE_SETS, relative_error
from tests.exports import copy_export
from vgrt._lazy import is_available
from vgrt.engines import open_runner
from vgrt.errors import InvalidInputError, MissingDependencyError
from vgrt.export import example_feed
from vgrt.export.feeds import random_feed
from vgrt.export.manifest import read_manifest
from vgrt.models.rebuild import module_from_manifest

needs_openvino = pytest.mark.skipif(
    not is_available("openvino"), reason="openvino is not installed: pip install 'vgrt[cpu]'"
)
pytestmark = needs_openvino
# bf16 against fp32 PyTorch, measured on the tiny preset (OpenVINO 2026.4, seeds 101 and 202): 4.2-4.3e-2 on
# the UNet for every feature set (the plain one too: the error is bf16 matmuls and convolutions, not the
# conditioning), 0.3-9e-3 on the encoders. The bound leaves 1.5x room.
BF16_TOLERANCE = 6.5e-2


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    """One compiled-model cache for the module, outside the shared exports (which stay as exported)."""
    return tmp_path_factory.mktemp("openvino-cache")


def has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def run_both(directory, feed, component="unet", **settings):
    with open_runner(directory, component, backend="torch") as reference, \
         open_runner(directory, component, backend="openvino", **settings) as runner:  # fmt: skip
        return reference.infer(feed), runner.infer(feed)


@pytest.mark.parametrize("features", FEATURE_SETS)
def test_fp32_matches_torch(tiny_export, ov_cache, features):
    directory = tiny_export(features=features)
    for seed in (101, 202):  # fresh inputs, not the ones the graph was traced with
        expected, got = run_both(directory, example_feed(directory, seed=seed), cache_dir=ov_cache)
        assert got["noise_pred"].dtype == torch.float32
        assert relative_error(got["noise_pred"], expected["noise_pred"]) <= 1e-4


@pytest.mark.parametrize("form", ["attention", "decomposed"])
def test_other_attention_forms_match_torch(tiny_export, ov_cache, form):
    directory = tiny_export(features="all", attention_form=form)  # the exports of tests/export/test_unet_parity.py
    expected, got = run_both(directory, example_feed(directory, seed=303), cache_dir=ov_cache)
    assert relative_error(got["noise_pred"], expected["noise_pred"]) <= 1e-4


@pytest.mark.parametrize("component", ENCODERS)
def test_encoders_match_torch(tiny_export, ov_cache, component):
    directory = tiny_export(components=",".join(ENCODERS))  # the export tests/export/test_components.py makes
    expected, got = run_both(directory, example_feed(directory, component, seed=606), component, cache_dir=ov_cache)
    spec = read_manifest(directory).component(component).spec
    assert list(got) == [t.name for t in spec.outputs]
    for t in spec.outputs:
        assert got[t.name].dtype == getattr(torch, t.dtype)
        assert relative_error(got[t.name], expected[t.name]) <= 1e-4, t.name


def test_fp16_export_runs_within_fp16_tolerance(tiny_export, ov_cache):
    directory = tiny_export(features="all", dtype="fp16")  # the export tests/export/test_unet_parity.py makes
    feed = example_feed(directory, seed=505)
    module, _ = module_from_manifest(read_manifest(directory))
    with torch.no_grad():  # the fp32 reference of the same weights
        expected = module(**{k: v.float() if v.is_floating_point() else v for k, v in feed.items()})
    with open_runner(directory, backend="openvino", cache_dir=ov_cache) as runner:
        got = runner.infer(feed)["noise_pred"]
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert relative_error(got, expected) <= 1e-2


@pytest.mark.parametrize("features", ["none", "all"])
def test_bf16_matches_torch_within_the_measured_tolerance(tiny_export, ov_cache, features):
    if not has_bf16():
        pytest.skip("this CPU has no BF16 units (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
    directory = tiny_export(features=features)
    for seed in (101, 202):
        expected, got = run_both(directory, example_feed(directory, seed=seed), precision="bf16", cache_dir=ov_cache)
        error = relative_error(got["noise_pred"], expected["noise_pred"])
        assert 1e-4 < error <= BF16_TOLERANCE  # above fp32's bound: bf16 arithmetic did run


def test_bf16_is_refused_on_a_cpu_without_it(tiny_export, tmp_path, monkeypatch):
    import openvino as ov

    real = ov.Core.get_property

    def no_bf16(core, *args):
        return ["FP32", "INT8", "BIN"] if args[-1] == "OPTIMIZATION_CAPABILITIES" else real(core, *args)

    monkeypatch.setattr(ov.Core, "get_property", no_bf16)
    runner = open_runner(tiny_export(features="none"), backend="openvino", precision="bf16", cache_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="'bf16' needs a CPU with BF16") as caught:
        runner.activate()
    assert "has only: FP32, INT8, BIN" in str(caught.value) and "precision='fp32'" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was prepared or compiled


def test_settings_reach_openvino(tiny_export, ov_cache):
    directory = tiny_export(features="none")
    with open_runner(directory, backend="openvino", threads=1, static_shapes=False, cache_dir=ov_cache) as runner:
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        assert runner.device == torch.device("cpu") and runner.backend == "openvino"
    with open_runner(directory, backend="openvino", threads=2, static_shapes=False, cache_dir=ov_cache) as runner:
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"precision": "fp16"}, "unknown OpenVINO precision 'fp16'; choose one of: fp32, bf16"),
        ({"threads": -1}, "threads must be a whole number >= 0"),
        ({"static_shapes": {"sample": (2, 4, 16, 16)}}, "a shape for every input of unet"),
        ({"static_shapes": {"sample": (2, 3, 16, 16), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}},
         "input 'sample' the shape (2, 3, 16, 16)"),
        ({"dtype": "fp32"}, "unknown openvino runner setting dtype"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_work(tiny_export, tmp_path, settings, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        open_runner(tiny_export(features="none"), backend="openvino", cache_dir=tmp_path, **settings)
    assert list(tmp_path.iterdir()) == []


def test_static_shapes_give_the_dynamic_results(tiny_export, ov_cache):
    directory = tiny_export(features="all")
    feed = example_feed(directory, seed=303)
    given = {name: tuple(value.shape) for name, value in feed.items()}
    outputs = []
    for static in (False, True, given):  # dynamic, the first call's shapes, shapes given up front
        with open_runner(directory, backend="openvino", static_shapes=static, cache_dir=ov_cache) as runner:
            outputs.append(runner.infer(feed)["noise_pred"])
            compiled = {p.get_any_name(): p.get_partial_shape() for p in runner.compiled.inputs}
        if static:  # every dim of the compiled model is fixed to the feed's
            assert {name: tuple(shape.to_shape()) for name, shape in compiled.items()} == given
        else:
            assert compiled["sample"].is_dynamic
    dynamic, first_call, up_front = outputs
    assert relative_error(first_call, dynamic) <= 1e-5 and relative_error(up_front, dynamic) <= 1e-5


def test_other_shapes_run_on_a_dynamic_model_besides_the_static_one(tiny_export, ov_cache):
    directory = tiny_export(features="none")
    spec = read_manifest(directory).component("unet").spec
    first, other = (random_feed(spec, spec.profile_sizes(which), seed=1) for which in ("opt", "min"))
    with open_runner(directory, backend="openvino", static_shapes=False, cache_dir=ov_cache) as dynamic:
        expected = [dynamic.infer(feed)["noise_pred"] for feed in (first, other, first)]
    with open_runner(directory, backend="openvino", cache_dir=ov_cache) as runner:  # static_shapes=True
        assert runner.models == ()  # nothing compiled before the first call
        got = [runner.infer(feed)["noise_pred"] for feed in (first, other, first)]
        static, dynamic = runner.models
    assert static.shapes == {name: tuple(value.shape) for name, value in first.items()} and dynamic.shapes is None
    assert not static.model.inputs[0].get_partial_shape().is_dynamic
    assert dynamic.model.inputs[0].get_partial_shape().is_dynamic
    for one, reference in zip(got, expected):
        assert relative_error(one, reference) <= 1e-5


def test_shapes_given_up_front_refuse_other_shapes(tiny_export, ov_cache):
    directory = tiny_export(features="none")
    spec = read_manifest(directory).component("unet").spec
    first, other = (random_feed(spec, spec.profile_sizes(which), seed=1) for which in ("opt", "min"))
    shapes = {name: tuple(value.shape) for name, value in first.items()}
    with open_runner(directory, backend="openvino", static_shapes=shapes, cache_dir=ov_cache) as runner:
        runner.infer(first)
        with pytest.raises(InvalidInputError, match="compiled for static shapes .* static_shapes=True"):
            runner.infer(other)
        assert len(runner.models) == 1


def test_concurrent_first_calls_compile_once(tiny_export, ov_cache):
    directory = tiny_export(features="none")
    spec = read_manifest(directory).component("unet").spec
    feed = random_feed(spec, spec.profile_sizes("opt"), seed=2)
    with open_runner(directory, backend="openvino", cache_dir=ov_cache) as runner:
        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(lambda _: runner.infer(feed)["noise_pred"], range(4)))
        assert len(runner.models) == 1
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_a_second_open_reuses_the_prepared_and_compiled_model(tiny_export, tmp_path):
    directory = tiny_export(features="all")
    feed = example_feed(directory, seed=404)

    def open_and_run():
        with open_runner(directory, backend="openvino", cache_dir=tmp_path) as runner:
            return runner.infer(feed)["noise_pred"], runner.compiled.get_property("LOADED_FROM_CACHE"), runner.folder

    def listing():
        return {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    first, from_cache, folder = open_and_run()
    after_first = listing()
    second, from_cache_again, _ = open_and_run()
    assert not from_cache and from_cache_again
    assert listing() == after_first  # nothing prepared or compiled again, nothing rewritten
    blobs = list((folder / "compiled").glob("*.blob"))
    assert len(blobs) == 1 and (folder / "unet.onnx").is_file()
    assert folder.parent == tmp_path and folder.name.startswith("unet-")
    assert torch.equal(first, second)


def test_the_cache_is_keyed_by_settings_and_content_and_defaults_to_the_export(tiny_export, tmp_path):
    export = copy_export(tiny_export(features="none"), tmp_path / "export")
    folders = []
    for settings in ({}, {"threads": 1}, {"static_shapes": False}):
        with open_runner(export, backend="openvino", **settings) as runner:
            folders.append(runner.folder)
    assert {f.parent for f in folders} == {export / "openvino"} and len(set(folders)) == 2
    assert folders[2] == folders[0]  # static and dynamic models share one folder (their blobs' names differ)
    # A model OpenVINO reads as exported is linked, not copied.
    assert all((f / "unet.onnx").samefile(export / "unet.onnx") for f in folders)


def test_external_weights_are_linked_not_copied(tiny_export, tmp_path):
    import onnx

    from vgrt.engines.openvino_runner import OpenVinoRunner
    from vgrt.export.verify import file_sha256

    directory = tiny_export(features="all")
    spec = read_manifest(directory).component("unet").spec
    onnx.save(onnx.load(directory / "unet.onnx"), tmp_path / "unet.onnx", save_as_external_data=True,
              location="unet.onnx.data", size_threshold=0)  # fmt: skip
    files = {name: {"sha256": file_sha256(tmp_path / name)} for name in ("unet.onnx", "unet.onnx.data")}
    feed = example_feed(directory, seed=505)
    with open_runner(directory, backend="torch") as reference:
        expected = reference.infer(feed)["noise_pred"]
    with OpenVinoRunner(tmp_path / "unet.onnx", spec, files) as runner:
        got = runner.infer(feed)["noise_pred"]
        prepared = runner.folder
    assert relative_error(got, expected) <= 1e-4
    assert (prepared / "unet.onnx.data").samefile(tmp_path / "unet.onnx.data")
    assert (prepared / "unet.onnx").stat().st_size < (tmp_path / "unet.onnx.data").stat().st_size  # graph only


def test_concurrent_calls_return_the_serial_results(tiny_export, ov_cache):
    directory = tiny_export(features="all")
    spec = read_manifest(directory).component("unet").spec
    sizes = [spec.profile_sizes("min"), spec.profile_sizes("opt")]
    feeds = [random_feed(spec, sizes[i % 2], seed=i) for i in range(12)]
    with open_runner(directory, backend="openvino", cache_dir=ov_cache) as runner:
        serial = [runner.infer(feed)["noise_pred"] for feed in feeds]
        start = threading.Barrier(4)

        def work(first):
            start.wait()
            return [(i, runner.infer(feeds[i])["noise_pred"]) for i in range(first, len(feeds), 4)]

        with ThreadPoolExecutor(4) as pool:
            parallel = dict(pair for part in pool.map(work, range(4)) for pair in part)
        # the calls did overlap, each with its own infer request (two shapes: the static and the dynamic model)
        assert sum(model.calls.made for model in runner.models) > 2
    assert [i for i, out in enumerate(serial) if not torch.equal(out, parallel[i])] == []


def test_inputs_are_shared_and_outputs_written_in_place(tiny_export, ov_cache):
    directory = tiny_export(features="none")
    feed = example_feed(directory, seed=606)
    with open_runner(directory, backend="openvino", cache_dir=ov_cache, reuse_outputs=True) as runner:
        first = runner.infer(feed)["noise_pred"]
        with runner.models[0].calls.acquire() as call:
            request = call.request
        assert np.shares_memory(request.get_tensor("sample").data, feed["sample"].numpy())
        assert np.shares_memory(request.get_tensor("noise_pred").data, first.numpy())
        again = runner.infer(feed)["noise_pred"]
        assert again.data_ptr() == first.data_ptr()  # reuse_outputs: the same buffer, written in place


def test_masked_row_guard_keeps_the_meaning_and_fixes_openvino():
    """A row whose keys are all -inf attends to nothing (zeros), also in OpenVINO, whose CPU ReduceMax of
    such a row is the lowest finite float (it made the NaN-free softmax divide 0 by 0)."""
    import onnx
    import onnx.inliner
    import onnxruntime
    import openvino as ov
    from onnx import helper

    from vgrt.engines.openvino_runner import guard_masked_rows
    from vgrt.plugins.masked_attention.onnx_form import function_proto

    shapes = {"q": (1, 1, 2, 4), "k": (1, 1, 3, 4), "v": (1, 1, 3, 4), "bias": (1, 1, 2, 3), "out": (1, 1, 2, 4)}
    tensors = {n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n, shape in shapes.items()}
    node = helper.make_node("MaskedAttention", ["q", "k", "v", "bias"], ["out"], domain="vgrt")
    graph = helper.make_graph([node], "g", [tensors[n] for n in ("q", "k", "v", "bias")], [tensors["out"]])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("vgrt", 1)],
        functions=[function_proto("decomposed", 23)],
    )  # fmt: skip
    model = onnx.inliner.inline_local_functions(model)
    guarded = onnx.ModelProto.FromString(model.SerializeToString())
    assert guard_masked_rows(guarded.graph) == 1
    guard = next(n for n in guarded.graph.node if n.op_type == "IsInf")
    assert guard.input == ["bias"]  # the test reads the bias, not the (larger) scores
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in ("q", "k", "v")}
    feed["bias"] = np.array([[[[0.0, -np.inf, 0.0], [-np.inf] * 3]]], np.float32)  # row 2: every key masked
    expected = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert np.isfinite(expected).all() and (expected[0, 0, 1] == 0).all()
    assert np.array_equal(onnxruntime.InferenceSession(guarded.SerializeToString()).run(None, feed)[0], expected)
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(guarded.SerializeToString()), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    np.testing.assert_allclose(compiled(feed)[0], expected, rtol=1e-6, atol=1e-7)


def test_missing_openvino_names_the_extra(tiny_export, tmp_path, monkeypatch):
    runner = open_runner(tiny_export(features="none"), backend="openvino", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail like an absent package
    with pytest.raises(MissingDependencyError, match=r"pip install 'vgrt\[cpu\]'"):
        runner.activate()
