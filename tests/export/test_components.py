"""VAE, text and image encoders and the adapters export and run on ONNX Runtime exactly like PyTorch."""

import pytest
import torch

from vgrt.engines import open_runner
from vgrt.errors import InvalidInputError
from vgrt.export import example_feed
from vgrt.export.components import parse_components
from vgrt.export.manifest import read_manifest
from vgrt.models.presets import get_preset

ENCODERS = (
    "vae_encoder", "vae_decoder", "text_encoder", "image_encoder", "image_proj", "fusion_mlp", "appearance_net", "aligner",
)  # fmt: skip


@pytest.fixture(scope="module")
def encoders_dir(tiny_export):
    return tiny_export(components=",".join(ENCODERS))


@pytest.mark.parametrize("component", ENCODERS)
def test_component_matches_torch(encoders_dir, component):
    feed = example_feed(encoders_dir, component, seed=606)
    with (
        open_runner(encoders_dir, component, "torch") as reference,
        open_runner(encoders_dir, component, "onnxruntime") as ort,
    ):
        expected, got = reference.infer(feed), ort.infer(feed)
    assert (
        expected.keys() == got.keys() == {t.name for t in read_manifest(encoders_dir).component(component).spec.outputs}
    )
    for name in expected:
        error = ((got[name].double() - expected[name].double()).norm() / expected[name].double().norm()).item()
        assert error <= 1e-4, name


def test_vae_shapes_chain_into_the_unet(encoders_dir):
    manifest = read_manifest(encoders_dir)
    images = torch.rand(2, 3, 48, 32) * 2 - 1
    with open_runner(encoders_dir, "vae_encoder", "onnxruntime") as encoder:
        latents = encoder.infer({"images": images})["latents"]
    assert latents.shape == (2, 4, 24, 16)  # the tiny VAE downsamples by 2
    with open_runner(encoders_dir, "vae_decoder", "onnxruntime") as decoder:
        assert decoder.infer({"latents": latents})["images"].shape == (2, 3, 48, 32)
    with pytest.raises(InvalidInputError, match="not a multiple of 4"):
        manifest.component("vae_encoder").spec.validate({"images": torch.zeros(1, 3, 30, 32)})


def test_token_ids_outside_the_vocabulary_are_refused(encoders_dir):
    spec = read_manifest(encoders_dir).component("text_encoder").spec
    with pytest.raises(
        InvalidInputError, match=r"'input_ids' has values in \[0, 1000\], expected values in \[0, 999\]"
    ):
        spec.validate({"input_ids": torch.tensor([[0] * 76 + [1000]])})


def test_component_names_are_checked():
    assert "text_encoder_2" in parse_components("all", get_preset("sdxl"))
    assert "text_encoder_2" not in parse_components("all", get_preset("sd15"))
    with pytest.raises(InvalidInputError, match="unknown component.*text_encoder_2.*'sd15'"):
        parse_components("unet,text_encoder_2", get_preset("sd15"))


def test_adapter_weights_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from vgrt.export.components import build_component
    from vgrt.models.source import ModelSource

    trained = build_component("fusion_mlp", ModelSource("tiny", seed=9), frozenset(), "float32").module
    (tmp_path / "fusion_mlp").mkdir()
    save_file(trained.state_dict(), tmp_path / "fusion_mlp" / "model.safetensors")
    loaded = build_component(
        "fusion_mlp", ModelSource("tiny", seed=0, weights=str(tmp_path)), frozenset(), "float32"
    ).module
    seeded = build_component("fusion_mlp", ModelSource("tiny", seed=0), frozenset(), "float32").module
    content, style = torch.randn(2, 1, 8, 32).unbind(0)
    torch.testing.assert_close(loaded(content, style), trained(content, style))
    assert not torch.allclose(seeded(content, style), trained(content, style))
