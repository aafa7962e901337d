"""Without TensorRT, every TensorRT entry point fails at once with MissingDependencyError saying what
to install, and `vgrt doctor` says why the plugin is unavailable."""

import sys

import pytest

from vgrt.cli import main
from vgrt.errors import MissingDependencyError
from vgrt.export.manifest import write_manifest
from vgrt.export.spec import unet_spec
from vgrt.models.presets import get_preset

INSTALL = r"pip install 'vgrt\[trt\]'"


@pytest.fixture(autouse=True)
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


@pytest.fixture
def export_dir(tmp_path):
    """A directory with a manifest only: the entry points must fail before reading any ONNX."""
    spec = unet_spec(get_preset("tiny"), frozenset(), "float16", num_blocks=2)
    unet = {"file": "unet.onnx", "spec": spec.to_json(), "features": [], "fp32_ops": [], "attention_form": "custom",
            "masked_attention_nodes": 0, "model_sha256": "0" * 64, "onnx_sha256": "0" * 64,
            "files": {"unet.onnx": {"bytes": 0, "sha256": "0" * 64}}}  # fmt: skip
    settings = {"opset": 23, "dtype": "fp16", "attention_form": "custom"}
    source = {"seed": 0, "weights": None, "allow_pickle": False}
    write_manifest(tmp_path, {"preset": "tiny", "source": source, "settings": settings, "components": {"unet": unet}})
    return tmp_path


def test_build(export_dir):
    from vgrt.engines.tensorrt import build_engine

    with pytest.raises(MissingDependencyError, match=INSTALL):
        build_engine(export_dir)


def test_build_command(export_dir, capsys):
    assert main(["build", str(export_dir), "--backend", "tensorrt", "--attention", "native"]) == 2
    assert "pip install 'vgrt[trt]'" in capsys.readouterr().err


def test_runner(export_dir):
    from vgrt.engines import open_runner
    from vgrt.engines.tensorrt import TrtRunner

    with pytest.raises(MissingDependencyError, match=INSTALL):
        open_runner(export_dir, backend="tensorrt")
    with pytest.raises(MissingDependencyError, match=INSTALL):
        TrtRunner(lambda: b"", unet_spec(get_preset("tiny"), frozenset(), "float16", num_blocks=2))


def test_plugin_registration():
    from vgrt.plugins.masked_attention import trt_plugin

    trt_plugin.register_plugin.cache_clear()
    with pytest.raises(MissingDependencyError, match=INSTALL):
        trt_plugin.register_plugin()
    trt_plugin.register_plugin.cache_clear()


def test_onnxruntime_tensorrt_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    from vgrt.engines.ort_runner import OrtRunner, OrtSettings

    runner = OrtRunner(
        tmp_path / "unet.onnx",
        unet_spec(get_preset("tiny"), frozenset(), "float32", 2),
        OrtSettings(provider="tensorrt"),
    )
    with pytest.raises(MissingDependencyError, match=INSTALL):
        runner.activate()


def test_doctor_says_why_the_plugin_is_unavailable():
    from vgrt.doctor import collect

    report = collect()
    assert not report["tensorrt"]["ok"] and not report["masked-attention plugin"]["ok"]
    assert "needs TensorRT" in report["masked-attention plugin"]["detail"]
    assert "vgrt[trt]" in report["masked-attention plugin"]["detail"]
