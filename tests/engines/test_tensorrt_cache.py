"""The engine cache: keys change with every part, stores are atomic, and a stale or corrupt engine is
detected before TensorRT sees it and rebuilt (the build steps that need TensorRT are stood in for)."""

import dataclasses
import json
import shutil
import types

import onnx
import pytest

from vgrt.engines.tensorrt import build as build_module
from vgrt.engines.tensorrt.build import BuildSettings, build_engine, engine_key
from vgrt.engines.tensorrt.cache import EngineCache, EngineKey
from vgrt.engines.tensorrt.gpu import Gpu
from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export.manifest import read_manifest
from vgrt.plugins.masked_attention import trt_plugin
from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION

KEY = EngineKey(
    component="unet",
    onnx_sha256="a" * 64,
    tensorrt_version="11.1.0",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    profile=(("sample", (1, 4, 8, 8), (2, 4, 64, 64), (4, 4, 128, 128)),),
    plugin_version="1+abc",
    build=(("aot", True), ("attention", "plugin"), ("component", "unet"), ("optimization_level", 3)),
)
CHANGES = {
    "component": "vae",
    "onnx_sha256": "b" * 64,
    "tensorrt_version": "11.2.0",
    "gpu_name": "NVIDIA H200",
    "compute_capability": "8.9",
    "profile": (("sample", (1, 4, 8, 8), (2, 4, 64, 64), (8, 4, 128, 128)),),
    "plugin_version": "1+def",
    "build": (("aot", False), ("attention", "plugin"), ("component", "unet"), ("optimization_level", 3)),
}


def test_every_part_of_the_key_changes_its_digest():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(EngineKey)}
    digests = {dataclasses.replace(KEY, **{name: value}).digest for name, value in CHANGES.items()}
    assert len(digests) == len(CHANGES) and KEY.digest not in digests


def test_stored_engine_loads_back_and_leaves_no_temporary_file(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"serialized engine")
    assert path == cache.engine_path(KEY) and cache.load(KEY) == b"serialized engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, cache.record_path(KEY).name])


def test_corrupt_engine_is_detected_discarded_and_never_returned(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"serialized engine")
    path.write_bytes(b"serialized enginf")  # same size, one byte off
    assert cache.load(KEY) is None
    assert not path.exists() and not cache.record_path(KEY).exists()


@pytest.mark.parametrize("damage", ["other key", "truncated record", "missing engine"])
def test_stale_or_broken_entries_are_not_loaded(tmp_path, damage):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"serialized engine")
    record = cache.record_path(KEY)
    if damage == "other key":
        data = json.loads(record.read_text())
        data["key"]["tensorrt_version"] = "10.14.0"
        record.write_text(json.dumps(data))
    elif damage == "truncated record":
        record.write_text(record.read_text()[:20])
    else:
        path.unlink()
    assert cache.load(KEY) is None and not record.exists()


def test_timing_cache_is_per_gpu_model_and_tensorrt_version(tmp_path):
    cache = EngineCache(tmp_path)
    paths = {cache.timing_cache_path(dataclasses.replace(KEY, **change)) for change in (
        {}, {"gpu_name": "NVIDIA L4"}, {"compute_capability": "8.9"}, {"tensorrt_version": "11.2.0"})}  # fmt: skip
    assert len(paths) == 4
    assert cache.timing_cache_path(dataclasses.replace(KEY, onnx_sha256="c" * 64)) == cache.timing_cache_path(KEY)


# --- build_engine, with the steps that need TensorRT and a GPU stood in for -----------------------

GPU = Gpu("NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture
def export_dir(tiny_export, tmp_path):
    """A private copy of a tiny fp16 export with masked attention (builds write into it)."""
    return shutil.copytree(tiny_export(features="all", dtype="fp16"), tmp_path / "export")


@pytest.fixture
def builds(monkeypatch):
    """Stands in for TensorRT: records each engine build; the rest of build_engine runs for real."""
    made, registered = [], []

    @dataclasses.dataclass(frozen=True)
    class EngineBytesStandIn:
        path: object
        spec: object
        timing_cache: object
        optimization_level: int

        def __call__(self):
            made.append(self.path)
            return b"engine built from " + self.path.name.encode()

    monkeypatch.setattr(build_module, "require_tensorrt", lambda: types.SimpleNamespace(__version__="11.1.0"))
    monkeypatch.setattr(build_module, "require", lambda name: None)
    monkeypatch.setattr(build_module, "current_gpu", lambda index=0: GPU)
    monkeypatch.setattr(build_module, "EngineBytesFromOnnxPath", EngineBytesStandIn)
    monkeypatch.setattr(trt_plugin, "register_plugin", lambda: registered.append(MASKED_ATTENTION.plugin_id))
    return types.SimpleNamespace(made=made, registered=registered)


def test_build_writes_the_plugin_form_registers_the_plugin_and_caches(export_dir, builds):
    path = build_engine(export_dir)
    assert builds.registered == [MASKED_ATTENTION.plugin_id]
    (onnx_path,) = builds.made
    assert onnx_path == export_dir / "unet.trt-plugin-aot.onnx"
    nodes = [n for n in onnx.load(onnx_path).graph.node if n.op_type == MASKED_ATTENTION.name]
    assert nodes and all({a.name for a in n.attribute} == set(MASKED_ATTENTION.node_attributes(True)) for n in nodes)
    assert path.parent == export_dir / "tensorrt" and path.read_bytes() == b"engine built from unet.trt-plugin-aot.onnx"
    assert build_engine(export_dir) == path and len(builds.made) == 1  # cached


def test_corrupt_or_stale_cached_engine_is_rebuilt_not_loaded(export_dir, builds):
    path = build_engine(export_dir)
    path.write_bytes(b"garbage")
    assert build_engine(export_dir) == path and len(builds.made) == 2
    assert path.read_bytes().startswith(b"engine built from")
    record = path.with_suffix(".json")
    data = json.loads(record.read_text())
    data["key"]["gpu_name"] = "another GPU"
    record.write_text(json.dumps(data))
    assert build_engine(export_dir) == path and len(builds.made) == 3


def test_changed_onnx_is_refused(export_dir, builds):
    with (export_dir / "unet.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="changed since it was exported"):
        build_engine(export_dir)


def test_native_route_builds_from_the_attention_op_form_without_the_plugin(export_dir, builds):
    plugin_engine = build_engine(export_dir)
    native_engine = build_engine(export_dir, BuildSettings(attention="native"))
    assert native_engine != plugin_engine and builds.registered == [MASKED_ATTENTION.plugin_id]
    model = onnx.load(builds.made[-1])
    assert builds.made[-1].name == "unet.trt-native.onnx"
    assert "Attention" in {n.op_type for n in model.graph.node}
    assert MASKED_ATTENTION.name not in {n.op_type for n in model.graph.node}


def test_key_follows_the_settings_and_the_plugin(export_dir):
    manifest = read_manifest(export_dir)
    entry = manifest.component("unet")
    keys = {s: engine_key(manifest, entry, s, "11.1.0", GPU) for s in (
        BuildSettings(), BuildSettings(aot=False), BuildSettings(attention="native"), BuildSettings(optimization_level=5))}  # fmt: skip
    assert len({k.digest for k in keys.values()}) == 4
    assert keys[BuildSettings()].plugin_version.startswith(MASKED_ATTENTION.version + "+")
    assert keys[BuildSettings(attention="native")].plugin_version == ""
    assert {name for name, *_ in keys[BuildSettings()].profile} == {t.name for t in entry.spec.inputs}


def test_plugin_route_needs_the_custom_form(export_dir, builds):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["components"]["unet"]["attention_form"] = "attention"
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="--attention custom"):
        build_engine(export_dir)


def test_runner_from_export_finds_the_built_engine(export_dir, builds, monkeypatch):
    from vgrt.engines.tensorrt import runner as runner_module
    from vgrt.engines.tensorrt import runner_from_export as lookup

    monkeypatch.setattr(lookup, "require_tensorrt", lambda: types.SimpleNamespace(__version__="11.1.0"))
    monkeypatch.setattr(lookup, "current_gpu", lambda index=0: GPU)
    monkeypatch.setattr(runner_module, "require_tensorrt", lambda: None)
    with pytest.raises(ArtifactError, match="vgrt build .* --backend tensorrt --attention plugin"):
        lookup.runner_from_export(export_dir)
    path = build_engine(export_dir)
    runner = lookup.runner_from_export(export_dir, cuda_graph=True)
    assert runner.needs_plugin and runner.settings.cuda_graph and not runner.is_active
    assert runner.engine_loader() == path.read_bytes()
    path.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="no valid TensorRT engine"):
        runner.engine_loader()
