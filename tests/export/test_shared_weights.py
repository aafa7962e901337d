"""Cache entries share their common weight files: each tensor of a large export is a content-named file,
hard-linked from one store in the cache; pruning frees what no entry links, and a cache where links
cannot be made keeps a copy per entry."""

import errno
import hashlib
import logging
import os

import pytest
import torch

from vgrt._lazy import is_available
from vgrt.engines import open_runner
from vgrt.export import cache, exporter
from vgrt.export.blobs import STORE, blob_name
from vgrt.export.cache_entries import folder_bytes, list_entries, prune
from vgrt.export.exporter import ExportSettings
from vgrt.export.feeds import example_feed
from vgrt.export.manifest import read_manifest, write_manifest
from vgrt.export.spec import unet_spec
from vgrt.export.verify import file_sha256, stamp_file
from vgrt.models.presets import get_preset

SHARED, ONLY_NONE, ONLY_MUTUAL = b"shared weights " * 100, b"none's own weights " * 100, b"mutual's own " * 100


def blob_files(directory):
    return {p.name: p for p in directory.iterdir() if p.suffix == ".bin"}


@pytest.fixture
def fake_exports(monkeypatch):
    """Stands in for the exporter: a UNet export whose weights are content-named files (SHARED and one
    tensor of its own per feature set)."""

    def fake_write_export(directory, settings):
        directory.mkdir(parents=True)
        files = {"unet.onnx": b"a graph"}
        for data in (SHARED, ONLY_NONE if settings.features == "none" else ONLY_MUTUAL):
            files[blob_name(file_sha256_of(data))] = data
        stamps = {}
        for name, data in files.items():
            (directory / name).write_bytes(data)
            stamps[name] = stamp_file(directory / name)
        spec = unet_spec(get_preset("tiny"), frozenset(), "float32", num_blocks=2)
        entry = {"file": "unet.onnx", "spec": spec.to_json(), "features": [], "fp32_ops": [], "attention_form": "custom",
                 "masked_attention_nodes": 0, "model_sha256": "0" * 64, "onnx_sha256": stamps["unet.onnx"].sha256,
                 "files": {name: {"bytes": s.bytes, "sha256": s.sha256} for name, s in stamps.items()}}  # fmt: skip
        write_manifest(directory, {
            "preset": "tiny", "source": {"seed": 0, "weights": None, "allow_pickle": False},
            "settings": {"opset": 23, "dtype": "fp32", "attention_form": "custom"}, "components": {"unet": entry},
        })  # fmt: skip
        return directory

    monkeypatch.setattr(cache, "write_export", fake_write_export)


def file_sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def verify_entry(directory):
    manifest = read_manifest(directory)
    manifest.path(manifest.component("unet"))  # raises unless every file is the exported one


def test_entries_link_one_copy_and_prune_frees_only_orphans(tmp_path, fake_exports, monkeypatch):
    none = cache.cached_export(ExportSettings(preset="tiny", features="none"), tmp_path)
    mutual = cache.cached_export(ExportSettings(preset="tiny", features="mutual"), tmp_path)
    shared = blob_name(file_sha256_of(SHARED))
    assert os.path.samefile(none / shared, mutual / shared) and os.path.samefile(
        none / shared, tmp_path / STORE / shared
    )
    assert (none / shared).stat().st_nlink == 3  # two entries and the store
    assert len(os.listdir(tmp_path / STORE)) == 3
    hashed = []
    monkeypatch.setattr("vgrt.export.verify.file_sha256", lambda path: hashed.append(path.name) or file_sha256(path))
    for entry in (none, mutual):
        verify_entry(entry)
    # Each entry's links were recorded as verified, and a later entry's link to a shared file (which changes
    # its change time) does not undo that: only the graph files are hashed, once.
    assert hashed == ["unet.onnx", "unet.onnx"]
    for entry in (none, mutual):
        verify_entry(entry)
    assert len(hashed) == 2
    entries = list_entries(tmp_path)
    assert sum(e.bytes for e in entries) == folder_bytes(tmp_path)  # a shared file counts once in the total

    [(_, reason)] = prune([e for e in entries if e.path == none])
    assert reason is None and not none.exists()
    assert sorted(os.listdir(tmp_path / STORE)) == sorted(blob_files(mutual))  # none's own tensor is gone
    assert (mutual / shared).stat().st_nlink == 2
    verify_entry(mutual)


def test_a_cache_that_cannot_link_keeps_a_copy_per_entry(tmp_path, fake_exports, monkeypatch, caplog):
    def refuse(source, target, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))

    monkeypatch.setattr(os, "link", refuse)
    with caplog.at_level(logging.WARNING, logger="vgrt.export.blobs"):
        none = cache.cached_export(ExportSettings(preset="tiny", features="none"), tmp_path)
        mutual = cache.cached_export(ExportSettings(preset="tiny", features="mutual"), tmp_path)
    shared = blob_name(file_sha256_of(SHARED))
    assert not os.path.samefile(none / shared, mutual / shared) and (none / shared).stat().st_nlink == 1
    assert os.listdir(tmp_path / STORE) == []
    assert len(caplog.records) == 2 and "Invalid cross-device link" in caplog.text
    assert "the entry keeps its own copy" in caplog.text
    for entry in (none, mutual):
        verify_entry(entry)
    assert cache.cached_export(ExportSettings(preset="tiny", features="none"), tmp_path) == none  # reused as is


def test_a_damaged_stored_copy_is_replaced_not_linked(tmp_path, fake_exports):
    shared = blob_name(file_sha256_of(SHARED))
    (tmp_path / STORE).mkdir()
    (tmp_path / STORE / shared).write_bytes(b"x" * len(SHARED))
    none = cache.cached_export(ExportSettings(preset="tiny", features="none"), tmp_path)
    verify_entry(none)
    assert os.path.samefile(none / shared, tmp_path / STORE / shared)
    assert (tmp_path / STORE / shared).read_bytes() == SHARED


@pytest.fixture(scope="module")
def feature_set_cache(tmp_path_factory):
    """The tiny UNet of 'none' and 'all' in one cache, saved as a large model is (a file per tensor)."""
    root = tmp_path_factory.mktemp("shared-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "PROTOBUF_LIMIT", 0)  # every model "too large": weights in content-named files
        yield {f: cache.cached_export(ExportSettings(preset="tiny", features=f), root) for f in ("none", "all")}


@pytest.mark.slow
def test_feature_sets_share_their_common_tensors(feature_set_cache):
    none, every = feature_set_cache["none"], feature_set_cache["all"]
    none_blobs, every_blobs = blob_files(none), blob_files(every)
    assert len(none_blobs) > 100 and set(none_blobs) < set(every_blobs)  # 'all' adds tensors, keeps none's
    for name, path in none_blobs.items():
        assert path.stat().st_ino == every_blobs[name].stat().st_ino and path.stat().st_nlink == 3
    assert all(every_blobs[name].stat().st_nlink == 2 for name in set(every_blobs) - set(none_blobs))
    shared_bytes = sum(p.stat().st_size for p in none_blobs.values())
    assert folder_bytes(none.parent) == folder_bytes(none) + folder_bytes(every) - shared_bytes


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(not is_available("openvino"),
                                        reason="openvino is not installed: pip install 'vgrt[cpu]'"))]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", ["none", "all"])
def test_shared_exports_match_torch(feature_set_cache, tmp_path, features, backend):
    directory = feature_set_cache[features]
    settings = {"cache_dir": tmp_path, "threads": 1} if backend == "openvino" else {}
    feed = example_feed(directory, seed=101)
    with open_runner(directory, backend="torch") as reference, open_runner(directory, backend=backend, **settings) as r:
        expected, got = reference.infer(feed)["noise_pred"], r.infer(feed)["noise_pred"]
    assert isinstance(got, torch.Tensor) and relative_error(got, expected) <= 1e-4
