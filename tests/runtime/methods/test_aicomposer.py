"""AIComposer on the tiny preset: backend parity, the image-token window and gate, the kept background."""

import pytest
import torch

from tests.runtime.methods.inputs import box_mask, random_image
from vgrt.engines.base import RunnerWrapper
from vgrt.errors import InvalidInputError
from vgrt.export.feeds import random_feed
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.methods import aicomposer
from vgrt.runtime.methods.common import layer_gates, to_latent_grid
from vgrt.runtime.sampling import Phase

from ..helpers import relative_error


def request(**overrides) -> aicomposer.AIComposerRequest:
    settings = {"steps": 6, "inversion_steps": 3, "image_token_end": 4, "adain_end": 3, "prompt": "a red cube"}
    settings.update(overrides)
    return aicomposer.AIComposerRequest(
        random_image(1), box_mask(4, 28, 6, 26), random_image(2), box_mask(8, 24, 4, 20), **settings
    )


@pytest.fixture(scope="module")
def torch_result(composers):
    return aicomposer.compose(composers("torch"), request())


def test_onnxruntime_matches_torch(composers, torch_result):
    ours = aicomposer.compose(composers("onnxruntime"), request())
    error = (ours.latents - torch_result.latents).norm() / torch_result.latents.norm()
    assert error <= 1e-4, f"relative error {error:.2e}"


def test_background_equals_the_inverted_background(composers, torch_result):
    composer, req = composers("torch"), request()
    placement = aicomposer.place(req)
    clean = aicomposer.inversion_start(composer, req, placement)
    blank = aicomposer.exceptional_prompt(composer, 32, 32)
    trajectory = aicomposer.invert_placement(composer, req, clean, aicomposer.inversion_text(composer, blank))
    outside = to_latent_grid(placement.region, *trajectory.shape[-2:]) == 0
    assert outside.any() and not outside.all()
    torch.testing.assert_close(torch_result.latents[0][:, outside], trajectory[0, 0][:, outside], rtol=0, atol=1e-6)
    assert not torch.allclose(torch_result.latents[0][:, ~outside], trajectory[0, 0][:, ~outside], atol=1e-3)


def test_image_tokens_only_on_foreground_queries_and_inside_the_step_window(composers, monkeypatch):
    composer, req = composers("torch"), request()
    seen = {}
    denoise = aicomposer.denoise

    def recording_denoise(*args, before_step, **kwargs):
        def hook(i, t, latents, feed):
            before_step(i, t, latents, feed)
            seen[i] = {name: value.clone() for name, value in feed.items()}

        return denoise(*args, before_step=hook, **kwargs)

    monkeypatch.setattr(aicomposer, "denoise", recording_denoise)
    aicomposer.compose(composer, req)
    assert sorted(seen) == list(range(req.inversion_steps, req.steps))
    foreground = to_latent_grid(aicomposer.place(req).foreground_mask, *seen[req.steps - 1]["sample"].shape[-2:])
    blank = aicomposer.exceptional_prompt(composer, 32, 32)["encoder_hidden_states"]
    for i, feed in seen.items():
        if i > req.image_token_end:  # the plain UNet, one row: both halves would be the exceptional prompt
            assert "extra_tokens" not in feed and feed["sample"].shape[0] == 1, f"step {i}"
            torch.testing.assert_close(feed["encoder_hidden_states"], blank)
            continue
        assert (feed["layer_gates"][:, 0] == 1.0).all(), f"step {i}"
        for half in feed["extra_gate"]:  # both guidance halves, as the code's out_index = [0, B//2]
            torch.testing.assert_close(half[0], foreground)
        # the exceptional prompt in the unconditional half (the code's negative prompt)
        torch.testing.assert_close(feed["encoder_hidden_states"][:1], blank)
    assert foreground.any() and not foreground.all()
    window, after = seen[req.inversion_steps], seen[req.steps - 1]
    assert not torch.equal(window["encoder_hidden_states"], after["encoder_hidden_states"])


class RowRecorder(RunnerWrapper):
    """Records (which UNet, rows) of every call of the runner it wraps."""

    def __init__(self, runner, calls: list):
        super().__init__(runner)
        gated = any(t.name == "layer_gates" for t in runner.spec.inputs)
        self.calls, self.kind = calls, "conditioned" if gated else "plain"

    def infer_impl(self, feed, sizes):
        self.calls.append((self.kind, len(feed["sample"])))
        return self.runner.infer_impl(feed, sizes)


def test_steps_after_the_image_token_window_run_one_row_of_the_plain_unet(composer_cache):
    calls, req = [], request()

    def hook(component, runner):
        return RowRecorder(runner, calls) if component == "unet" else runner

    with Composer.from_preset("tiny", backend="torch", cache=composer_cache, progress=False, runner_hook=hook) as c:
        aicomposer.compose(c, req)
    window = req.image_token_end + 1 - req.inversion_steps
    after = req.steps - req.image_token_end - 1
    assert window and after
    assert calls == [("plain", 1)] * req.inversion_steps + [("conditioned", 2)] * window + [("plain", 1)] * after


def gated_off_after_window(composer, req, prompt, blank):
    """What the steps after the window ran before they took the plain UNet: the conditioned UNet, guided,
    both halves the exceptional prompt, the image tokens gated off."""
    unet = composer.runner("unet", aicomposer.FEATURES)
    context = blank["encoder_hidden_states"]
    zeros = torch.zeros(1, 1, context.shape[-1])
    latent_hw = [side // composer.preset.vae_factor for side in req.background.shape[2:]]
    cond = {
        **prompt, "encoder_hidden_states": context, "extra_tokens": zeros, "extra_gate": torch.ones(1, 1, *latent_hw),
        "layer_gates": layer_gates(unet.spec.input("layer_gates").shape[0], composer.device),
    }  # fmt: skip
    conditioning = Conditioning(cond, {**blank, "extra_tokens": zeros})
    return (Phase(req.image_token_end + 1, unet, conditioning, req.guidance_scale),)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_one_plain_row_after_the_window_gives_the_guided_gated_off_result(composers, backend, monkeypatch):
    new = aicomposer.compose(composers(backend), request()).latents
    monkeypatch.setattr(aicomposer, "after_window", gated_off_after_window)
    old = aicomposer.compose(composers(backend), request()).latents
    assert relative_error(new, old) <= 1e-5


def test_image_tokens_change_the_unet_output_only_when_their_gate_is_open(composers):
    unet = composers("torch").runner("unet", aicomposer.FEATURES)
    feed = random_feed(unet.spec, {"batch": 1, "height": 8, "width": 8, "context": 77, "extra": 4}, seed=0)
    other = dict(feed, extra_tokens=feed["extra_tokens"] + 1.0)
    for open_gate in (1.0, 0.0):
        gates = torch.zeros_like(feed["layer_gates"])
        gates[:, 0] = open_gate
        a = unet.infer(dict(feed, layer_gates=gates))["noise_pred"]
        b = unet.infer(dict(other, layer_gates=gates))["noise_pred"]
        assert torch.equal(a, b) != bool(open_gate)


def test_placement_pastes_the_cropped_foreground_into_the_box():
    req = request()
    placement = aicomposer.place(req)
    inside = placement.foreground_mask[0, 0] > 0
    rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 4, 19)
    torch.testing.assert_close(placement.composite[..., ~inside], req.background[..., ~inside])
    assert (
        placement.region >= placement.foreground_mask
    ).all() and placement.region.sum() > placement.foreground_mask.sum()


def test_adaptive_latent_normalization_takes_the_reference_statistics():
    latent, reference = torch.randn(4, 8, 8) * 3 + 2, torch.randn(4, 8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    out = aicomposer.adaptive_latent_normalization(latent, reference, inside, 1.0)
    torch.testing.assert_close(out[:, inside].mean(1), reference[:, ~inside].mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, inside].std(1), reference[:, ~inside].std(1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out[:, ~inside], latent[:, ~inside])
    torch.testing.assert_close(aicomposer.adaptive_latent_normalization(latent, reference, inside, 0.0), latent)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"foreground_mask": torch.zeros(1, 1, 32, 32)}, "foreground mask is empty"),
        ({"placement": torch.ones(1, 1, 16, 16)}, r"placement mask has shape"),
        ({"steps": 6, "inversion_steps": 0}, r"inversion_steps=0 must lie in \[1, steps=6\)"),
        ({"image_token_end": 2}, r"image_token_end=2 must lie in \[inversion_steps=3, steps=6\)"),
    ],
)
def test_bad_requests_are_refused_before_any_engine_runs(overrides, message):
    fields = {k: overrides.pop(k) for k in ("foreground_mask", "placement") if k in overrides}
    req = request(**overrides)
    if fields:
        req = aicomposer.AIComposerRequest(
            req.foreground, fields.get("foreground_mask", req.foreground_mask), req.background,
            fields.get("placement", req.placement), steps=req.steps,
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match=message):
        req.validate()
