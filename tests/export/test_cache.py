"""The export cache reuses an export exactly when nothing that shapes it changed."""

import dataclasses

from vgrt.export import cache
from vgrt.export.exporter import ExportSettings


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


def test_second_use_reuses_the_export(tmp_path, monkeypatch):
    made = []

    def fake_export(directory, settings):
        made.append(directory)
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text("{}")
        return directory

    monkeypatch.setattr(cache, "export", fake_export)
    settings = ExportSettings(preset="tiny", components="vae_decoder")
    first = cache.cached_export(settings, tmp_path)
    assert cache.cached_export(settings, tmp_path) == first and len(made) == 1
    monkeypatch.setenv("VGRT_CACHE", str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"
