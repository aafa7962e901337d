"""The export cache reuses an export exactly when nothing that shapes it changed and its files are intact;
a damaged entry is reported in one line and exported again, or refused where nothing can export it."""

import dataclasses
import logging
import sys

import pytest

from vgrt._lazy import is_available
from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export import cache, verify
from vgrt.export.exporter import ExportSettings
from vgrt.export.manifest import MANIFEST, write_manifest
from vgrt.export.spec import unet_spec
from vgrt.export.verify import RECORD, stamp_file
from vgrt.models.presets import get_preset

SETTINGS = ExportSettings(preset="tiny", components="vae_decoder")


def test_key_changes_with_each_setting_and_the_weights(tmp_path):
    base = ExportSettings(preset="tiny", components="unet", features="mutual")
    keys = {cache.cache_key(base)}
    for change in (
        {"preset": "sd15"}, {"components": "vae_decoder"}, {"features": "none"}, {"dtype": "fp16"},
        {"opset": 18}, {"attention_form": "decomposed"}, {"seed": 1},
    ):  # fmt: skip
        keys.add(cache.cache_key(dataclasses.replace(base, **change)))
    assert len(keys) == 8
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"1")
    with_weights = cache.cache_key(dataclasses.replace(base, weights=str(weights)))
    weights.write_bytes(b"22")
    assert cache.cache_key(dataclasses.replace(base, weights=str(weights))) != with_weights


def test_key_changes_with_the_unet_contract_only_where_a_unet_is_exported(monkeypatch):
    """An export of an older input contract (say mutual attention over every row) is never reused."""
    unet = ExportSettings(preset="tiny", components="unet", features="mutual")
    keys = {settings: cache.cache_key(settings) for settings in (unet, SETTINGS)}

    def renamed_input(*args, **kwargs):
        spec = unet_spec(*args, **kwargs)
        inputs = (dataclasses.replace(spec.inputs[-1], name="renamed"), *spec.inputs[:-1])
        return dataclasses.replace(spec, inputs=inputs)

    monkeypatch.setattr(cache, "unet_spec", renamed_input)
    assert cache.cache_key(unet) != keys[unet]
    assert cache.cache_key(SETTINGS) == keys[SETTINGS]  # no UNet in it: its key stays


@pytest.fixture
def exports(monkeypatch):
    """Stands in for the exporter with a small valid export (one ONNX-named file); lists what it made."""
    made = []

    def fake_write_export(directory, settings):
        made.append(directory)
        directory.mkdir(parents=True)
        onnx_file = directory / "vae_decoder.onnx"
        onnx_file.write_bytes(b"an onnx model of the vae decoder")
        stamp = stamp_file(onnx_file)
        spec = unet_spec(get_preset("tiny"), frozenset(), "float32", num_blocks=2)
        entry = {"file": onnx_file.name, "spec": spec.to_json(), "features": [], "fp32_ops": [],
                 "attention_form": "custom", "masked_attention_nodes": 0, "model_sha256": "0" * 64,
                 "onnx_sha256": stamp.sha256, "files": {onnx_file.name: {"bytes": stamp.bytes, "sha256": stamp.sha256}}}  # fmt: skip
        write_manifest(directory, {
            "preset": "tiny", "source": {"seed": 0, "weights": None, "allow_pickle": False},
            "settings": {"opset": 23, "dtype": "fp32", "attention_form": "custom"}, "components": {"vae_decoder": entry},
        })  # fmt: skip
        return directory

    monkeypatch.setattr(cache, "write_export", fake_write_export)
    return made


def test_second_use_reuses_the_export(tmp_path, monkeypatch, exports):
    first = cache.cached_export(SETTINGS, tmp_path)
    assert cache.cached_export(SETTINGS, tmp_path) == first and len(exports) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # the entry's lock is gone with its holder
    monkeypatch.setenv("VGRT_CACHE", str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: flip_a_byte(d / "vae_decoder.onnx"), "vae_decoder.onnx' changed since it was exported (damaged)"),
        (lambda d: (d / "vae_decoder.onnx").write_bytes(b"an onnx"), "vae_decoder.onnx' changed since it was exported"),
        (lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:100]), "manifest.json' is not valid JSON"),
        (lambda d: (d / "vae_decoder.onnx").unlink(), "vae_decoder.onnx' is missing"),
    ],
    ids=["flipped-byte", "truncated-onnx", "truncated-manifest", "missing-onnx"],
)
def test_damaged_entry_is_reported_in_one_line_and_exported_again(tmp_path, exports, caplog, damage, reason):
    entry = cache.cached_export(SETTINGS, tmp_path)
    damage(entry)
    with caplog.at_level(logging.INFO, logger="vgrt"):
        assert cache.cached_export(SETTINGS, tmp_path) == entry
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and str(entry) in lines[0] and reason in lines[0] and "exporting it again" in lines[0]
    assert len(exports) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [entry.name]
    assert cache._entry_problem(entry) is None


def test_verified_entry_is_reused_without_hashing_its_files(tmp_path, exports, monkeypatch):
    entry = cache.cached_export(SETTINGS, tmp_path)
    cache.cached_export(SETTINGS, tmp_path)  # the stand-in exporter wrote no record: this check hashes
    assert (entry / RECORD).is_file()

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(verify, "file_sha256", no_hashing)
    assert cache.cached_export(SETTINGS, tmp_path) == entry and len(exports) == 1


def test_without_the_exporter_a_damaged_or_missing_entry_is_refused_by_name(tmp_path, exports, monkeypatch):
    entry = cache.cached_export(SETTINGS, tmp_path)
    flip_a_byte(entry / "vae_decoder.onnx")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnxscript", None)
        is_available.cache_clear()
        with pytest.raises(ArtifactError, match="damaged .*changed since it was exported") as damaged:
            cache.cached_export(SETTINGS, tmp_path)
        with pytest.raises(ArtifactError, match="is not in the cache") as missing:
            cache.cached_export(dataclasses.replace(SETTINGS, seed=7), tmp_path)
    is_available.cache_clear()
    for caught in (damaged, missing):
        assert str(tmp_path) in str(caught.value) and "pip install 'vgrt[cpu]'" in str(caught.value)
    assert len(exports) == 1 and (entry / "vae_decoder.onnx").is_file()  # nothing deleted, nothing exported


def test_cache_that_cannot_be_written_is_used_if_intact_and_named_if_not(tmp_path, exports, monkeypatch):
    entry = cache.cached_export(SETTINGS, tmp_path)

    def read_only(target, wait=True):
        raise PermissionError(13, "Permission denied", str(target.parent / f".{target.name}.lock"))

    monkeypatch.setattr(cache, "target_lock", read_only)
    assert cache.cached_export(SETTINGS, tmp_path) == entry
    with pytest.raises(InvalidInputError, match="cannot be written .*Permission denied.*VGRT_CACHE") as caught:
        cache.cached_export(dataclasses.replace(SETTINGS, seed=7), tmp_path)
    assert str(tmp_path) in str(caught.value) and len(exports) == 1


def test_first_use_removes_other_entries_leftovers_that_no_live_process_owns(tmp_path, exports):
    from vgrt.export.staging import target_lock

    stale, live = tmp_path / ".tiny-0123456789abcdef.tmp-0a1b2c3d", tmp_path / ".tiny-fedcba9876543210.old-4e5f6a7b"
    not_ours = [tmp_path / ".tiny-0123456789abcdef.tmp-notmine", tmp_path / "tiny-0123456789abcdef.tmp-0a1b2c3d"]
    for folder in (stale, live, *not_ours):
        folder.mkdir()
        (folder / "unet.onnx.data").write_bytes(b"gigabytes")
    with target_lock(tmp_path / "tiny-fedcba9876543210"):  # an export of that entry is running
        entry = cache.cached_export(SETTINGS, tmp_path)
    assert not stale.exists() and live.exists() and all(folder.exists() for folder in not_ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, live.name, *(p.name for p in not_ours)])
