"""Export writes a complete directory or nothing, replaces only its own exports, and records where its weights
came from."""

import dataclasses
import json
import shutil

import pytest
import torch

from vgrt.errors import ArtifactError, InvalidInputError, WeightsError
from vgrt.export import exporter
from vgrt.export.exporter import ExportSettings, export
from vgrt.export.manifest import read_manifest
from vgrt.models.source import ModelSource
from vgrt.models.unet import build_unet


def test_manifest_describes_the_export(tiny_export):
    directory = tiny_export(features="all")
    manifest = read_manifest(directory)
    unet = manifest.component("unet")
    assert manifest.data["preset"] == "tiny" and manifest.data["settings"]["opset"] == 23
    assert set(manifest.data["versions"]) >= {"vgrt", "torch", "onnx", "onnxruntime"}
    assert len(manifest.data["components"]["unet"]["model_sha256"]) == 64
    assert unet.spec.profile_shapes()["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert manifest.data["components"]["unet"]["masked_attention_nodes"] > 0
    assert not [p for p in directory.parent.iterdir() if ".tmp-" in p.name]


def test_interrupted_export_leaves_no_directory_and_keeps_the_old_one(tmp_path, monkeypatch, tiny_export):
    def interrupted_while_saving(name, source, features, settings, staging):  # after the minute of tracing
        (staging / f"{name}.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt

    old = tmp_path / "old"
    shutil.copytree(tiny_export(features="none"), old)
    before = read_manifest(old).data
    monkeypatch.setattr(exporter, "_export_component", interrupted_while_saving)
    for target in (tmp_path / "new", old):
        with pytest.raises(KeyboardInterrupt):
            export(target, ExportSettings(preset="tiny"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no staging, no lock, no new directory
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path / "new")
    manifest = read_manifest(old)
    assert manifest.data == before
    manifest.path(manifest.component("unet"))  # its files still verify


def test_out_that_is_not_a_vgrt_export_is_refused_before_any_work(tmp_path, monkeypatch, tiny_export):
    def no_work(*args, **kwargs):
        raise AssertionError("an export started")

    monkeypatch.setattr(exporter, "build_component", no_work)
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"png")
    extended = tmp_path / "export"
    shutil.copytree(tiny_export(features="none"), extended)
    (extended / "README.txt").write_text("my notes on this export")
    cases = [
        (user_file, "is a file, not a vgrt export"),
        (folder, r"is a folder that is not a vgrt export .*\(cat.png\)"),
        (extended, r"holds files vgrt did not write \(README.txt\)"),
    ]
    for target, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern) as caught:
            export(target, ExportSettings(preset="tiny"))
        assert str(target) in str(caught.value) and "choose another --out, or remove it yourself" in str(caught.value)
    assert user_file.read_text() == "mine" and (folder / "cat.png").read_bytes() == b"png"
    assert (extended / "README.txt").is_file() and read_manifest(extended).component("unet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes.txt", "photos"]


def test_export_command_refuses_a_file_with_exit_code_2(tmp_path, capsys):
    from vgrt.cli import main

    user_file = tmp_path / "model.onnx"
    user_file.write_bytes(b"not mine to delete")
    assert main(["export", "--out", str(user_file)]) == 2
    assert f"{str(user_file)!r} is a file" in capsys.readouterr().err
    assert user_file.read_bytes() == b"not mine to delete"


def test_export_replaces_an_empty_folder_and_an_earlier_export(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    settings = ExportSettings(preset="tiny", components="aligner")
    export(target, settings)
    first = read_manifest(target).data["components"]["aligner"]["onnx_sha256"]
    export(target, dataclasses.replace(settings, seed=1))
    manifest = read_manifest(target)
    assert manifest.data["components"]["aligner"]["onnx_sha256"] != first
    assert manifest.path(manifest.component("aligner")).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_settings_fail_before_any_work(tmp_path):
    cases = [
        (ExportSettings(preset="sd4"), "unknown preset 'sd4'"),
        (ExportSettings(features="colour"), "unknown feature"),
        (ExportSettings(opset=17), "opset 17 is too old"),
        (ExportSettings(opset=18, attention_form="attention"), "needs opset >= 23"),
        (ExportSettings(dtype="int4"), "unknown dtype 'int4'"),
        (ExportSettings(weights=str(tmp_path / "missing")), "does not exist"),
    ]
    for settings, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern):
            export(tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A diffusers-layout folder holding the tiny UNet with seed 5 as safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    (folder / "unet").mkdir()
    unet = build_unet(ModelSource("tiny", seed=5), frozenset()).unet
    save_file(
        {k: v.contiguous() for k, v in unet.state_dict().items()},
        folder / "unet" / "diffusion_pytorch_model.safetensors",
    )
    unet.save_config(folder / "unet")
    return folder


def test_real_weights_load_from_a_diffusers_folder(tiny_weights):
    loaded = build_unet(ModelSource("tiny", seed=0, weights=str(tiny_weights)), frozenset()).unet.state_dict()
    seeded = build_unet(ModelSource("tiny", seed=5), frozenset()).unet.state_dict()
    assert all(torch.equal(loaded[k], seeded[k]) for k in seeded)


def test_missing_corrupt_and_pickled_weights_are_refused(tmp_path, tiny_weights):
    with pytest.raises(WeightsError, match="no unet weights under"):
        build_unet(ModelSource("tiny", weights=str(tmp_path)), frozenset())
    corrupt = tmp_path / "unet.safetensors"
    corrupt.write_bytes((tiny_weights / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        build_unet(ModelSource("tiny", weights=str(corrupt)), frozenset())
    pickled = tmp_path / "unet.bin"
    torch.save({}, pickled)
    with pytest.raises(WeightsError, match="allow_pickle=True"):
        build_unet(ModelSource("tiny", weights=str(pickled)), frozenset())
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match="do not fit the model: missing"):
        build_unet(ModelSource("tiny", weights=str(wrong)), frozenset())


def test_torch_backend_refuses_weights_that_changed_since_export(tmp_path, tiny_export):
    from vgrt.engines import open_runner

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export(features="none"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["seed"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="differ from the exported ones"):
        open_runner(copy, backend="torch")
