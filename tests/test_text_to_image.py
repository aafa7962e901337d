"""Plain text-to-image computes what diffusers' StableDiffusionPipeline computes (DDIM, guidance) on the
same diffusers folder, on every CPU backend, and the folder writer makes a folder diffusers reads."""

import numpy as np
import pytest
import torch

from vgrt.models.diffusers_folder import write_diffusers_folder
from vgrt.models.source import ModelSource
from vgrt.runtime import text_to_image
from vgrt.runtime.composer import Composer
from vgrt.runtime.sampling import random_latents

PROMPT, STEPS, SIZE = "a red ball on green grass", 3, 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_folder(ModelSource("tiny", 0), tmp_path_factory.mktemp("tiny-diffusers") / "model")


@pytest.fixture(scope="module")
def diffusers_image(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=_noise(), output_type="np")
    return torch.from_numpy(out.images[0])  # [H, W, 3] in [0, 1]


def _noise() -> torch.Tensor:
    return random_latents((1, 4, SIZE // 2, SIZE // 2), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_text_to_image_matches_diffusers_pipeline(folder, diffusers_image, backend, composer_cache):
    options = {"threads": 1} if backend == "openvino" else {}
    with Composer.from_pretrained(  # the backends share the folder's exports
        folder, preset="tiny", backend=backend, cache=composer_cache, progress=False, runner_options=options
    ) as composer:
        request = text_to_image.TextToImageRequest(PROMPT, SIZE, SIZE, steps=STEPS, latents=_noise())
        composition = text_to_image.compose(composer, request)
    pixels = ((composition.image[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
    assert set(composition.times.seconds) == {"encode", "denoise", "decode"}
    assert pixels.shape == diffusers_image.shape
    assert (pixels - diffusers_image).abs().max() < 1e-4


def test_folder_tokenizer_keeps_the_presets_special_ids(folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(PROMPT)["input_ids"]
    assert (ids[0], ids[-1]) == (998, 999)  # the tiny text encoder's start and end tokens
    assert max(ids[1:-1]) < 998 and len(ids) < len(PROMPT)  # merges applied: fewer tokens than characters
    assert np.array_equal(sorted(tokenizer.get_vocab().values())[:3], [0, 1, 2])
