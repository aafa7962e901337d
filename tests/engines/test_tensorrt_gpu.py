"""TensorRT engines on a GPU: both attention routes and both plugin implementations against ONNX
Runtime on the CPU, CUDA graph replay, shared activation memory, and an AOT engine that deserializes
with no vgrt plugin registered. Skipped (with the reason) where TensorRT or a GPU is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

from vgrt._lazy import is_available


def _missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    for module, extra in (("tensorrt", "trt"), ("polygraphy", "trt"), ("triton", "gpu")):
        if not is_available(module):
            return f"needs {module} (pip install 'vgrt[{extra}]')"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.trt, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export(features="all", dtype="fp16")


@pytest.fixture(scope="module")
def feed_and_expected(export_dir):
    from vgrt.engines import open_runner
    from vgrt.export import example_feed

    feed = example_feed(export_dir)
    with open_runner(export_dir, backend="onnxruntime") as runner:
        return feed, runner.infer(feed)["noise_pred"].float()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float().cpu() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("settings", [{"attention": "plugin"}, {"attention": "plugin", "aot": False}, {"attention": "native"}],
                         ids=["plugin-aot", "plugin-jit", "native"])  # fmt: skip
def test_engine_matches_onnxruntime(export_dir, feed_and_expected, settings):
    from vgrt.engines import open_runner
    from vgrt.engines.tensorrt import BuildSettings, build_engine

    build_engine(export_dir, BuildSettings(**settings))
    feed, expected = feed_and_expected
    with open_runner(export_dir, backend="tensorrt", **settings) as runner:
        got = runner.infer({k: v.cuda() for k, v in feed.items()})["noise_pred"]
    assert got.is_cuda and not got.isnan().any()
    assert _relative_error(got, expected) < 1e-2


def test_cuda_graph_replay_and_shared_memory_give_the_same_result(export_dir, feed_and_expected):
    from vgrt.engines import open_runner
    from vgrt.engines.tensorrt import SharedDeviceMemory, build_engine

    build_engine(export_dir)
    feed, expected = feed_and_expected
    feed = {k: v.cuda() for k, v in feed.items()}
    shared = SharedDeviceMemory()
    with open_runner(export_dir, backend="tensorrt", cuda_graph=True, shared_memory=shared) as graphed, \
         open_runner(export_dir, backend="tensorrt", shared_memory=shared) as plain:  # fmt: skip
        results = [graphed.infer(feed)["noise_pred"] for _ in range(3)]  # run and capture, then replays
        with graphed._calls.acquire() as call:  # the context that served those calls
            assert len(call.graphs) == 1
        results.append(plain.infer(feed)["noise_pred"])
    for got in results:
        torch.testing.assert_close(got, results[0])
    assert _relative_error(results[0], expected) < 1e-2


def test_aot_engine_deserializes_without_the_python_plugin(export_dir):
    from vgrt.engines.tensorrt import build_engine

    path = build_engine(export_dir)
    code = textwrap.dedent(
        f"""
        import tensorrt as trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(open({str(path)!r}, "rb").read())
        assert engine is not None and engine.create_execution_context() is not None
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
