"""An engine set exports only what is asked for, one component at a time; runs prebuilt export folders
without exporting; builds or finds TensorRT engines once, sharing one activation buffer; refuses the
tensorrt backend before any export where TensorRT or a GPU is missing; owns one device; and on the torch
backend runs the very module `module()` hands out (one copy of the weights)."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import pytest
import torch

from vgrt.engines import engine_set
from vgrt.engines.engine_set import EngineSet, ExportCache, PrebuiltExports
from vgrt.errors import ArtifactError, InvalidInputError, MissingDependencyError
from vgrt.export import cache
from vgrt.models.source import ModelSource
from vgrt.runtime.composer import Composer

INSTALL = r"pip install 'vgrt\[trt\]'"


class FakeRunner:
    """What the set opens on the onnxruntime or tensorrt backend, recording how it was opened."""

    def __init__(self, directory, component, **settings) -> None:
        self.directory, self.component, self.settings = directory, component, settings
        self.is_active = False

    def activate(self):
        self.is_active = True
        return self

    def deactivate(self) -> None:
        self.is_active = False


@pytest.fixture
def exports(tmp_path, monkeypatch):
    """Stands in for the export cache: lists the ExportSettings of every export asked for."""
    asked = []

    def cached_export(settings, root=None):
        time.sleep(0.01)  # a window in which a second thread would start its own export
        asked.append(settings)
        return tmp_path / settings.components

    monkeypatch.setattr(cache, "cached_export", cached_export)
    monkeypatch.setattr(engine_set, "open_runner", lambda d, c, backend, **s: FakeRunner(d, c, backend=backend, **s))
    return asked


def test_each_component_is_exported_on_its_own_and_only_when_asked_for(exports):
    engines = EngineSet(ExportCache(ModelSource("tiny", seed=3), "fp16"))
    engines.open("vae_encoder", "text_encoder")
    engines.runner("unet", "mutual")
    engines.runner("text_encoder", "mutual")  # features are the UNet's: the same text encoder
    assert [(s.components, s.features) for s in exports] == [
        ("vae_encoder", "none"), ("text_encoder", "none"), ("unet", "mutual")
    ]  # fmt: skip
    assert all((s.preset, s.seed, s.dtype) == ("tiny", 3, "fp16") for s in exports)
    keys = {cache.cache_key(s) for s in exports}
    assert len(keys) == 3, "each component has its own cache entry"


def test_a_diffusers_folder_without_an_image_encoder_runs_the_components_it_has(tmp_path, exports):
    from vgrt.errors import WeightsError

    (tmp_path / "unet").mkdir()  # no image_encoder/: MCA-Ctrl never needs one
    engines = EngineSet(ExportCache(ModelSource("tiny", weights=str(tmp_path))))
    engines.open("vae_encoder", "text_encoder", "vae_decoder")  # what MCA-Ctrl opens besides its UNet
    assert [s.components for s in exports] == ["vae_encoder", "text_encoder", "vae_decoder"]
    assert all(s.weights == str(tmp_path) for s in exports)
    with pytest.raises(WeightsError, match="image_encoder"):
        engines.module("image_encoder")


def test_threads_asking_for_one_runner_share_one_export(exports):
    engines = EngineSet(ExportCache(ModelSource("tiny")))
    with ThreadPoolExecutor(4) as pool:
        runners = list(pool.map(lambda _: engines.runner("unet", "extra"), range(4)))
    assert all(r is runners[0] for r in runners) and runners[0].is_active and len(exports) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"device": "mps"}, "device 'mps' is not supported"),
        ({"attention": "flash"}, "unknown attention route 'flash'; choose one of: plugin, native"),
        ({"runner_options": {"device": "cpu"}, "backend": "torch"}, "'device' is not taken per runner"),
        ({"runner_options": {"threads": 2}}, "unknown onnxruntime runner setting threads"),
        ({"runner_options": {"provider": "cuda"}}, "provider 'cuda' does not run on device 'cpu'"),
    ],
)
def test_bad_settings_are_refused_before_any_export(exports, settings, message):
    with pytest.raises(InvalidInputError, match=message):
        EngineSet(ExportCache(ModelSource("tiny")), **settings)
    assert exports == []


def test_the_device_is_a_torch_device_and_a_gpu_device_needs_a_gpu(exports, monkeypatch):
    composer = Composer.from_preset("tiny", progress=False)
    assert composer.device == torch.device("cpu") and composer.engines.device is composer.device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="device 'cuda:0' needs a CUDA GPU.*use device 'cpu'"):
        Composer.from_preset("tiny", backend="torch", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InvalidInputError, match="openvino backend runs on the CPU, not on 'cuda:1'"):
        Composer.from_preset("tiny", backend="openvino", device="cuda:1")
    assert exports == []


def test_onnxruntime_on_a_gpu_device_runs_the_cuda_provider_there(exports, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    runner = EngineSet(ExportCache(ModelSource("tiny")), "onnxruntime", "cuda:1").runner("vae_decoder")
    assert (runner.settings["provider"], runner.settings["device_id"]) == ("cuda", 1)
    assert EngineSet(ExportCache(ModelSource("tiny"))).runner("vae_encoder").settings == {"backend": "onnxruntime"}


def test_openvino_compiles_static_shapes_for_the_unet_only_unless_told(exports, monkeypatch):
    monkeypatch.setattr(engine_set, "check_settings", lambda backend, settings: None)  # no openvino needed here
    engines = EngineSet(ExportCache(ModelSource("tiny")), "openvino")
    assert engines.runner("unet").settings["static_shapes"] is True
    assert engines.runner("vae_decoder").settings["static_shapes"] is False
    told = EngineSet(ExportCache(ModelSource("tiny")), "openvino", runner_options={"static_shapes": False})
    assert told.runner("unet").settings["static_shapes"] is False


# --- TensorRT -----------------------------------------------------------------------------------------


def test_tensorrt_without_the_library_is_refused_before_any_export(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(MissingDependencyError, match=INSTALL):
        Composer.from_preset("tiny", backend="tensorrt", device="cuda")
    assert exports == []


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRT and Polygraphy importable, `vgrt build` and the runner replaced: lists the builds."""
    from vgrt.engines.tensorrt import build, runner_from_export

    for name in ("tensorrt", "polygraphy"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    built = []

    def build_engine(directory, settings):
        time.sleep(0.01)
        built.append((directory.name, settings))
        return directory / "tensorrt" / f"{settings.component}.plan"

    monkeypatch.setattr(build, "build_engine", build_engine)
    monkeypatch.setattr(runner_from_export, "runner_from_export", FakeRunner)
    return built


def test_tensorrt_without_a_gpu_is_refused_before_any_export(exports, fake_tensorrt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU"):
        Composer.from_preset("tiny", backend="tensorrt", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InvalidInputError, match="tensorrt backend runs on a CUDA GPU, not on 'cpu'"):
        Composer.from_preset("tiny", backend="tensorrt")
    assert exports == []


def test_tensorrt_engines_are_built_once_and_share_one_activation_buffer(tmp_path, exports, fake_tensorrt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engines = EngineSet(
        ExportCache(ModelSource("tiny")), "tensorrt", "cuda:1", "native", {"cuda_graph": True, "optimization_level": 2}
    )
    with ThreadPoolExecutor(4) as pool:
        unets = list(pool.map(lambda _: engines.runner("unet", "mutual"), range(4)))
    decoder = engines.runner("vae_decoder")
    assert all(unet is unets[0] for unet in unets)
    assert [(name, s.component, s.attention, s.optimization_level) for name, s in fake_tensorrt] == [
        ("unet", "unet", "native", 2), ("vae_decoder", "vae_decoder", "native", 2),
    ]  # fmt: skip
    for runner in (unets[0], decoder):
        assert runner.settings["shared_memory"] is engines._shared_memory and runner.settings["device"] == 1
        assert runner.settings["cuda_graph"] and runner.settings["attention"] == "native"
    assert engines._shared_memory.device == 1
    assert (tmp_path / "unet" / "tensorrt").is_dir() and not (tmp_path / "unet" / "tensorrt" / ".unet.lock").exists()


def test_prebuilt_tensorrt_folders_are_never_built(tmp_path, fake_tensorrt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    prebuilt = PrebuiltExports.open([manifest_only(tmp_path, "fp16")])
    runner = EngineSet(prebuilt, "tensorrt", "cuda").runner("unet")
    assert runner.directory == tmp_path and fake_tensorrt == []


# --- prebuilt export folders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prebuilt(tiny_export):
    return tiny_export(components="vae_encoder,vae_decoder"), tiny_export(features="all")  # shared with other tests


def test_prebuilt_folders_run_without_the_exporter(prebuilt, monkeypatch):
    def no_export(settings, root=None):
        raise AssertionError(f"exported {settings.components}")

    monkeypatch.setattr(cache, "cached_export", no_export)
    for exporter_package in ("onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, exporter_package, None)  # `import onnx` raises ImportError
    with Composer.from_exports(*prebuilt, progress=False) as composer:
        assert composer.engines.artifacts.source == ModelSource("tiny") and composer.dtype == "fp32"
        images = composer.decode_latents(torch.zeros(1, 4, 8, 8))
        assert images.shape == (1, 3, 16, 16) and images.device == composer.device
        assert composer.runner("unet", "all").spec.name == "unet"
        with pytest.raises(
            ArtifactError,
            match=r"holds the unet with features 'none'; they hold: vae_encoder, vae_decoder, unet \(extra_tokens, key_mask",
        ):
            composer.runner("unet")
        with pytest.raises(ArtifactError, match="vgrt export --components text_encoder` and add that folder"):
            composer.runner("text_encoder")


def manifest_only(folder, dtype):
    """An export folder with a manifest and no model: enough for what reads manifests only."""
    from vgrt.export.manifest import write_manifest
    from vgrt.export.spec import unet_spec
    from vgrt.models.presets import get_preset

    spec = unet_spec(get_preset("tiny"), frozenset(), {"fp32": "float32", "fp16": "float16"}[dtype], num_blocks=2)
    unet = {"file": "unet.onnx", "spec": spec.to_json(), "features": [], "fp32_ops": [], "attention_form": "custom",
            "masked_attention_nodes": 0, "model_sha256": "0" * 64, "onnx_sha256": "0" * 64,
            "files": {"unet.onnx": {"bytes": 0, "sha256": "0" * 64}}}  # fmt: skip
    write_manifest(folder, {
        "preset": "tiny", "source": {"seed": 0, "weights": None, "allow_pickle": False},
        "settings": {"opset": 23, "dtype": dtype, "attention_form": "custom"}, "components": {"unet": unet},
    })  # fmt: skip
    return folder


def test_prebuilt_folders_of_different_dtypes_are_refused(prebuilt, tmp_path):
    with pytest.raises(InvalidInputError, match="hold different models or dtypes .*in fp32 and .*in fp16"):
        PrebuiltExports.open([prebuilt[0], manifest_only(tmp_path, "fp16")])
    with pytest.raises(InvalidInputError, match="not the .* asked for; use Composer.from_exports"):
        Composer(ModelSource("tiny", seed=4), exports=prebuilt)


# --- one copy of the weights --------------------------------------------------------------------------


def test_the_torch_runner_runs_the_module_handed_out(exports):
    composer = Composer.from_preset("tiny", backend="torch", progress=False)
    unet = composer.runner("unet", "mutual")
    assert unet.module is composer.module("unet", "mutual") and exports == [], "the torch backend exports nothing"
    composer.close()
    assert not unet.is_active and next(composer.module("unet", "mutual").parameters()).device == composer.device
    half = Composer.from_preset("tiny", backend="torch", dtype="fp16", progress=False).runner("vae_decoder")
    assert half.dtype == torch.float16 and half.spec.input("latents").dtype == "float16"
