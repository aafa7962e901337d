"""Export writes a complete directory or nothing, and records where its weights came from."""

import json

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
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_save", fail)
    with pytest.raises(KeyboardInterrupt):
        export(tmp_path / "new", ExportSettings(preset="tiny"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path / "new")


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
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, folder / "unet" / "diffusion_pytorch_model.safetensors")
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
    import shutil

    from vgrt.engines import open_runner

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export(features="none"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["seed"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="differ from the exported ones"):
        open_runner(copy, backend="torch")
