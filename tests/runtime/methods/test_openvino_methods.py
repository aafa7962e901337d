"""Every method end to end on a `Composer` over OpenVINO fp32 against the torch backend (tiny preset,
32x32, 2-3 steps), and `vgrt compose --backend openvino`.

Measured (this module's requests): the final latents' largest relative error was 1.8e-5 (MCA-Ctrl edit;
the others 2e-6 to 8e-6) and the decoded images' PSNR 108-130 dB, so the limits below hold with room.
"""

import math

import pytest
import torch
from PIL import Image

from vgrt.cli import main
from vgrt.runtime.methods import aicomposer, locref, mca_ctrl, vcf
from vgrt.runtime.methods import visual_prompts as vp
from vgrt.runtime.methods.pno import PnoSettings

from ...test_determinism import locref_args
from ..helpers import relative_error
from . import test_aicomposer, test_locref, test_mca_ctrl, test_vcf, test_visual_prompts

LATENT_RTOL = 1e-4  # fp32 parity, as for ONNX Runtime; measured at most 1.8e-5
MIN_PSNR_DB = 80.0  # decoded images in [-1, 1]; measured at least 108 dB

# method -> (compose, request): the methods' own test requests, cut to a few steps
CASES = {
    "mca_ctrl-edit": (mca_ctrl.compose, lambda: test_mca_ctrl.request("edit", steps=3)),
    "mca_ctrl-generate": (mca_ctrl.compose, lambda: test_mca_ctrl.request("generate", steps=3)),
    "aicomposer": (
        aicomposer.compose,
        lambda: test_aicomposer.request(steps=3, inversion_steps=2, image_token_end=2, adain_end=2),
    ),
    "locref": (locref.compose, lambda: test_locref.request(steps=3)),
    "vcf": (vcf.compose, lambda: test_vcf.request(steps=3)),
    "vcf-pno": (vcf.compose, lambda: test_vcf.request(steps=2, pno=PnoSettings(iterations=2))),
    "visual_prompts": (vp.compose, lambda: test_visual_prompts.request(steps=3, guidance_steps=1)),
}


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (image.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


@pytest.mark.parametrize("case", CASES)
def test_openvino_fp32_matches_torch(composers, case):
    compose, request = CASES[case]
    expected = compose(composers("torch"), request())
    got = compose(composers("openvino"), request())
    error = relative_error(got.latents, expected.latents)
    assert error <= LATENT_RTOL, f"{case}: relative latent error {error:.2e}"
    assert psnr(got.image, expected.image) >= MIN_PSNR_DB
    assert got.image.shape == expected.image.shape
    assert list(got.times.seconds) == list(expected.times.seconds)
    if case == "visual_prompts":  # the layout is decided from the engine's attention maps
        assert got.assignment == expected.assignment and torch.equal(got.segments, expected.segments)


def test_the_composer_runs_openvino_runners(composers):
    composer = composers("openvino")
    assert composer.runner("vae_decoder").backend == "openvino"
    assert composer.runner("unet").settings.threads == 1  # runner_options reach every runner


def test_compose_cli_writes_an_openvino_image(tmp_path, examples, composer_cache):
    out = tmp_path / "openvino.png"
    assert main([*locref_args(examples, out, composer_cache), "--backend", "openvino", "--precision", "fp32"]) == 0
    with Image.open(out) as image:
        assert image.size == (32, 32)
        assert image.text["vgrt.backend"] == "openvino" and image.text["vgrt.precision"] == "fp32"


def test_compose_cli_refuses_precision_on_other_backends(tmp_path, examples, composer_cache, capsys):
    out = tmp_path / "refused.png"
    assert main([*locref_args(examples, out, composer_cache), "--backend", "torch", "--precision", "bf16"]) == 2
    assert "--precision bf16 does not run on the torch backend; it runs on: openvino" in capsys.readouterr().err
    assert not out.exists()
