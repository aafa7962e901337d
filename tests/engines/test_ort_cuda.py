"""The ONNX Runtime runner on CUDA, without a GPU: its device, its refusals, and the session it asks for
(a stand-in of onnxruntime's documented Python API records what the runner passes)."""

import sys
import types

import pytest
import torch

from vgrt.engines.ort_runner import OrtRunner, OrtSettings
from vgrt.errors import MissingDependencyError, VgrtError
from vgrt.export.spec import unet_spec
from vgrt.models.presets import get_preset

SPEC = unet_spec(get_preset("tiny"), frozenset(), "float32", 2)


def test_device_follows_the_provider():
    assert OrtRunner("unet.onnx", SPEC).device == torch.device("cpu")
    assert OrtRunner("unet.onnx", SPEC, OrtSettings(provider="cuda", device_id=1)).device == torch.device("cuda", 1)


def test_cuda_provider_missing_from_this_onnxruntime_is_refused_before_loading(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    runner = OrtRunner(tmp_path / "missing.onnx", SPEC, OrtSettings(provider="cuda"))
    with pytest.raises(MissingDependencyError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu and 'vgrt\[gpu\]'"):
        runner.activate()


class FakeStream:
    cuda_stream = 1234

    def __init__(self, device=None):
        self.device = device


@pytest.fixture
def fake_ort(monkeypatch):
    """An onnxruntime whose CUDA provider is listed; the session reports the providers `loaded` holds."""
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "0-fake"
    ort.sessions, ort.loaded = [], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class Options:
        def add_session_config_entry(self, key, value):
            pass

    class RunOptions:
        def __init__(self):
            self.entries = {}

        def add_run_config_entry(self, key, value):
            self.entries[key] = value

    class Session:
        def __init__(self, path, options, providers):
            self.providers = providers
            ort.sessions.append(self)

        def get_providers(self):
            return list(ort.loaded)

    ort.SessionOptions, ort.RunOptions, ort.InferenceSession = Options, RunOptions, Session
    ort.GraphOptimizationLevel = types.SimpleNamespace(
        ORT_DISABLE_ALL=0, ORT_ENABLE_BASIC=1, ORT_ENABLE_EXTENDED=2, ORT_ENABLE_ALL=99
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    return ort


def test_cuda_session_runs_on_the_runners_stream_without_end_of_run_syncs(fake_ort, tmp_path):
    runner = OrtRunner(tmp_path / "unet.onnx", SPEC, OrtSettings(provider="cuda", device_id=0)).activate()
    (session,) = fake_ort.sessions
    (name, options), cpu = session.providers
    assert (name, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    # A stream of its own: ONNX Runtime ignores handle 0, torch's default stream.
    assert options == {"device_id": 0, "has_user_compute_stream": "1", "user_compute_stream": "1234"}
    assert runner._run_options.entries == {"disable_synchronize_execution_providers": "1"}
    assert runner._where == ("cuda", 0)


def test_a_silent_fallback_to_the_cpu_is_refused(fake_ort, tmp_path):
    fake_ort.loaded = ["CPUExecutionProvider"]  # what ONNX Runtime reports when CUDA's libraries did not load
    runner = OrtRunner(tmp_path / "unet.onnx", SPEC, OrtSettings(provider="cuda"))
    with pytest.raises(VgrtError, match=r"fell back from CUDAExecutionProvider to \['CPUExecutionProvider'\]"):
        runner.activate()
    assert not runner.is_active


def test_cuda_without_a_gpu_is_refused(fake_ort, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VgrtError, match="needs a CUDA GPU"):
        OrtRunner(tmp_path / "unet.onnx", SPEC, OrtSettings(provider="cuda")).activate()
    assert fake_ort.sessions == []
