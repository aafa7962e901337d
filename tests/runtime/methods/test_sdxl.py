"""SDXL conditioning on tiny-sdxl: both text encoders, the pooled embedding and time_ids reach the UNet with
the values diffusers' SDXL pipeline gives them, every SDXL-capable method runs (with backend parity, slow),
AIComposer feeds SDXL as its released code does, and VCF is refused before any work."""

import copy

import pytest
import torch

from tests.conftest import composers_of
from vgrt.engines.base import RunnerWrapper
from vgrt.errors import InvalidInputError
from vgrt.export.components import build_component
from vgrt.export.spec import unet_spec
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.runtime import text_to_image
from vgrt.runtime.composer import Composer
from vgrt.runtime.images import Box
from vgrt.runtime.methods import aicomposer, locref, mca_ctrl, vcf
from vgrt.runtime.methods import visual_prompts as vp
from vgrt.runtime.methods.registry import get_method

from ..helpers import relative_error
from .inputs import box_mask, random_image
from .test_aicomposer import gated_off_after_window

PRESET = "tiny-sdxl"  # text encoders 32-d and 48-d (context 80), pooled 40-d: every width differs


class FeedRecorder(RunnerWrapper):
    """Keeps a copy of every feed of the runner it wraps."""

    def __init__(self, runner, feeds: list):
        super().__init__(runner)
        self.feeds = feeds

    def infer_impl(self, feed, sizes):
        self.feeds.append({name: value.clone() for name, value in feed.items()})
        return self.runner.infer_impl(feed, sizes)


@pytest.fixture(scope="module")
def sdxl(composer_cache):
    """sdxl(backend) -> a tiny-sdxl Composer, one per backend for the module."""
    yield from composers_of(PRESET, composer_cache)


def recording_composer(composer_cache, feeds: list) -> Composer:
    """A torch tiny-sdxl Composer whose UNet runners record their feeds into `feeds`."""

    def hook(component, runner):
        return FeedRecorder(runner, feeds) if component == "unet" else runner

    return Composer.from_preset(PRESET, backend="torch", cache=composer_cache, progress=False, runner_hook=hook)


def aicomposer_request(**changes) -> aicomposer.AIComposerRequest:
    settings = {"steps": 6, "inversion_steps": 3, "image_token_end": 4, "adain_end": 3, "prompt": "a red cube"}
    return aicomposer.AIComposerRequest(
        random_image(1), box_mask(4, 28, 6, 26), random_image(2, 32), box_mask(8, 24, 4, 20), **{**settings, **changes}
    )


def test_text_conditioning_concatenates_both_encoders_and_adds_pooled_and_time_ids(sdxl):
    composer = sdxl("torch")
    prompts = ["", "a red cube"]
    text = composer.text_conditioning(prompts, width=48, height=32)
    first = composer.infer("text_encoder", input_ids=composer.tokenizer(prompts))
    second = composer.infer("text_encoder_2", input_ids=composer.tokenizer_2(prompts))
    assert set(text) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    torch.testing.assert_close(
        text["encoder_hidden_states"],
        torch.cat([first["penultimate_hidden_state"], second["penultimate_hidden_state"]], dim=-1),
        rtol=0, atol=0,
    )  # fmt: skip
    torch.testing.assert_close(text["text_embeds"], second["pooled"], rtol=0, atol=0)
    assert text["encoder_hidden_states"].shape == (2, 77, 80) and text["text_embeds"].shape == (2, 40)
    # diffusers' defaults: original = target = (height, width), crop (0, 0)
    assert text["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    assert not torch.equal(text["encoder_hidden_states"][0], text["encoder_hidden_states"][1])


def test_unconditional_is_zeros_for_sdxl_and_the_empty_prompt_for_sd(sdxl, composers):
    empty = sdxl("torch").text_conditioning([""], width=32, height=32)
    uncond = sdxl("torch").unconditional(empty)
    assert get_preset(PRESET).force_zeros_for_empty_prompt and get_preset("sdxl").force_zeros_for_empty_prompt
    assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()
    assert empty["encoder_hidden_states"].any() and torch.equal(uncond["time_ids"], empty["time_ids"])
    sd_empty = composers("torch").text_conditioning([""], width=32, height=32)
    assert list(sd_empty) == ["encoder_hidden_states"] and composers("torch").unconditional(sd_empty) is sd_empty


def test_unet_spec_takes_the_presets_pooled_width():
    tiny = build_component("unet", ModelSource(PRESET), frozenset(), "float32").spec
    assert tiny.input("text_embeds").shape == ("batch", 40) and tiny.input("time_ids").shape == ("batch", 6)
    assert tiny.input("encoder_hidden_states").shape[-1] == 80
    full = unet_spec(get_preset("sdxl"), frozenset(), "float32", num_blocks=70)
    assert full.input("text_embeds").shape == ("batch", 1280) and full.input("encoder_hidden_states").shape[-1] == 2048


def test_text_to_image_feeds_the_pipelines_text_embeds_and_time_ids(composer_cache):
    feeds = []
    with recording_composer(composer_cache, feeds) as composer:
        request = text_to_image.TextToImageRequest("a fox", width=48, height=32, steps=2)
        text_to_image.compose(composer, request)
        prompt = composer.text_conditioning(["", "a fox"], width=48, height=32)  # as the method encodes it
        prompt = {name: value[1:] for name, value in prompt.items()}
    assert len(feeds) == 2
    for feed in feeds:  # rows: unconditional (zeros, no negative prompt), conditional
        assert feed["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2
        assert not feed["text_embeds"][0].any() and not feed["encoder_hidden_states"][0].any()
        torch.testing.assert_close(feed["text_embeds"][1:], prompt["text_embeds"], rtol=0, atol=0)
        torch.testing.assert_close(feed["encoder_hidden_states"][1:], prompt["encoder_hidden_states"], rtol=0, atol=0)


def test_aicomposer_feeds_sdxl_as_the_released_code(composer_cache):
    """Inversion: exceptional prompt, its pooled embedding, the code's fixed 1024 x 1024 time_ids. Sampling:
    the output size's time_ids; the conditional half's pooled embedding is the prompt's in and outside the
    image-token window, the unconditional half's the exceptional prompt's, so the steps after the window
    stay guided (two rows), on the plain UNet as the image tokens are gated off."""
    feeds, req = [], aicomposer_request()
    with recording_composer(composer_cache, feeds) as composer:
        aicomposer.compose(composer, req)
        prompt = composer.text_conditioning([req.prompt], width=32, height=32)
        blank = aicomposer.exceptional_prompt(composer, width=32, height=32)
    inversion, sampling = feeds[: req.inversion_steps], feeds[req.inversion_steps :]
    assert len(sampling) == req.steps - req.inversion_steps
    with_tokens = ["extra_tokens" in feed for feed in feeds]
    window = req.image_token_end + 1 - req.inversion_steps
    assert with_tokens == [False] * req.inversion_steps + [True] * window + [False] * (len(sampling) - window)
    for feed in inversion:
        assert feed["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
        torch.testing.assert_close(feed["text_embeds"], blank["text_embeds"], rtol=0, atol=0)
        torch.testing.assert_close(feed["encoder_hidden_states"], blank["encoder_hidden_states"], rtol=0, atol=0)
    expected_embeds = torch.cat([blank["text_embeds"], prompt["text_embeds"]])
    for step, feed in zip(range(req.inversion_steps, req.steps), sampling):
        assert feed["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2, f"step {step}"
        torch.testing.assert_close(feed["text_embeds"], expected_embeds, rtol=0, atol=0)
        context = prompt if step <= req.image_token_end else blank
        torch.testing.assert_close(feed["encoder_hidden_states"][1:], context["encoder_hidden_states"], rtol=0, atol=0)
        torch.testing.assert_close(feed["encoder_hidden_states"][:1], blank["encoder_hidden_states"], rtol=0, atol=0)
    assert not torch.equal(prompt["text_embeds"], blank["text_embeds"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_aicomposer_plain_unet_after_the_window_gives_the_gated_off_result(sdxl, backend, monkeypatch):
    """Two guided rows of the plain UNet after the window: the result of the conditioned UNet with its gates 0."""
    new = aicomposer.compose(sdxl(backend), aicomposer_request()).latents
    monkeypatch.setattr(aicomposer, "after_window", gated_off_after_window)
    old = aicomposer.compose(sdxl(backend), aicomposer_request()).latents
    assert relative_error(new, old) <= 1e-5


@pytest.mark.parametrize("preset", ["tiny", PRESET])
def test_exceptional_prompt_encodes_token_7788_without_position_embeddings(sdxl, composers, preset):
    """As the code's CLIPTextInv* encoders: every id 7788 (modulo tiny's vocabulary) in each text encoder, the
    full sequence encoded with the position embeddings left out; not what the engines' encoders give."""
    composer = sdxl("torch") if preset == PRESET else composers("torch")
    blank = aicomposer.exceptional_prompt(composer, width=32, height=32)
    ids = torch.full((1, 77), aicomposer.EXCEPTIONAL_TOKEN % composer.tokenizer.start, dtype=torch.int64)
    states = []
    for name in ("text_encoder", "text_encoder_2")[: 1 + composer.preset.is_sdxl]:
        encoder = copy.deepcopy(composer.module(name))
        getattr(encoder.model, "text_model", encoder.model).embeddings.position_embedding.weight.zero_()
        outputs = ("last_hidden_state", "penultimate_hidden_state", "pooled")
        states.append(dict(zip(outputs, encoder(ids))))
    expected = composer.encoder_conditioning(states, width=32, height=32)
    assert set(blank) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(blank[name], value, rtol=1e-5, atol=1e-5)
    with_positions = composer.token_conditioning(ids, ids, width=32, height=32)["encoder_hidden_states"]
    assert not torch.allclose(blank["encoder_hidden_states"], with_positions, atol=1e-2)


def test_sdxl_aicomposer_adapters_have_the_released_shapes():
    """IP-Adapter SDXL: ViT-bigG's 1280-d embeds -> 4 tokens of 2048 (`image_proj.proj`, `.norm`); the fusion
    MLP 2*8*2048 -> 512 -> 512 -> 8*2048 (`mlp.0/2/4`, demo.py's MLPCLIPFeatureNetwork with hidden_dim 512)."""
    source = ModelSource("sdxl")
    assert get_preset("sdxl").image_encoder["projection_dim"] == 1280
    projection = build_component("image_proj", source, frozenset(), "float32").module.state_dict()
    assert projection["proj.weight"].shape == (4 * 2048, 1280) and projection["norm.weight"].shape == (2048,)
    mlp = build_component("fusion_mlp", source, frozenset(), "float32").module.state_dict()
    shapes = {name: tuple(value.shape) for name, value in mlp.items() if name.endswith("weight")}
    assert shapes == {"mlp.0.weight": (512, 2 * 8 * 2048), "mlp.2.weight": (512, 512), "mlp.4.weight": (8 * 2048, 512)}


def test_vcf_is_refused_on_sdxl_before_any_work(no_work):
    with pytest.raises(InvalidInputError, match=r"VCF does not run on SDXL \('tiny-sdxl'\).*SD 2.1 or SD 1.x preset"):
        get_method("vcf").request({"prompt": "a fox", "reference": "fox.png"}, get_preset(PRESET))


def test_vcf_compose_refuses_sdxl_before_opening_a_runner(sdxl, monkeypatch):
    composer = sdxl("torch")
    monkeypatch.setattr(composer, "runner", lambda *args: pytest.fail("a runner was opened before the check"))
    request = vcf.VcfRequest("a fox", random_image(3, 40), 32, 32, steps=2)
    with pytest.raises(InvalidInputError, match="VCF does not run on SDXL"):
        vcf.compose(composer, request)


CASES = {
    "aicomposer": lambda c: aicomposer.compose(c, aicomposer_request()),
    "mca-ctrl": lambda c: mca_ctrl.compose(
        c,
        mca_ctrl.McaCtrlRequest(
            random_image(1), box_mask(8, 24, 8, 24), random_image(2), box_mask(4, 16, 16, 28), prompt="a dog", steps=4
        ),
    ),
    "locref": lambda c: locref.compose(
        c,
        locref.LocRefRequest("a dog", (random_image(4, 40),), (Box(0, 0, 16, 16),), width=32, height=32, steps=3),
    ),
    "visual-prompts": lambda c: vp.compose(
        c,
        vp.VisualPromptsRequest(
            (random_image(1, 40), random_image(2, 24)), 32, 32, "a dog and a cat", steps=3, guidance_steps=1
        ),
    ),
    "text-to-image": lambda c: text_to_image.compose(c, text_to_image.TextToImageRequest("a fox", 32, 32, steps=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_sdxl_method_runs_on_torch(sdxl, case):
    result = CASES[case](sdxl("torch"))
    assert result.image.shape == (1, 3, 32, 32) and torch.isfinite(result.latents).all()


@pytest.mark.slow  # each feature set's tiny-sdxl UNet is exported to ONNX first: about a minute each on 2 cores
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_sdxl_method_matches_torch_on_other_backends(sdxl, backend, case):
    expected, got = CASES[case](sdxl("torch")), CASES[case](sdxl(backend))
    assert relative_error(got.latents, expected.latents) <= 1e-4
