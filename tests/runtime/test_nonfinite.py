"""NaN and infinity: refused in feeds and settings, caught in the loops (naming the stage and the first bad
step) and after the VAE decoder, before any image is made."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError, NumericalError
from vgrt.export.spec import unet_spec
from vgrt.models.presets import get_preset
from vgrt.runtime.composer import Composer
from vgrt.runtime.grad_sampling import sample_with_grad
from vgrt.runtime.inversion import InversionSettings, invert
from vgrt.runtime.nonfinite import FirstNonFiniteStep
from vgrt.runtime.sampling import SamplingSettings, denoise
from vgrt.runtime.schedulers import build_scheduler

from .helpers import clean_latents, text_conditioning

SPEC = unet_spec(get_preset("tiny"), frozenset({"extra_tokens", "mutual"}), "float32", num_blocks=4)
PLAIN_SPEC = unet_spec(get_preset("tiny"), frozenset(), "float32", num_blocks=4)
NON_FINITE = (math.nan, math.inf, -math.inf)


def valid_feed(spec=SPEC) -> dict[str, torch.Tensor]:
    sizes = spec.profile_sizes("opt")
    fill = {t.name: 0.5 if t.value_range else 0 for t in spec.inputs}  # masks and gates in [0, 1], indices 0
    return {t.name: torch.full(spec.shape(t, sizes), fill[t.name], dtype=getattr(torch, t.dtype)) for t in spec.inputs}


class BreakingRunner(Runner):
    """A stand-in UNet: predicts a small constant, or NaN from call `bad_call` on; counts its calls."""

    backend = "stub"

    def __init__(self, bad_call: int | None = None):
        super().__init__(PLAIN_SPEC)
        self.bad_call, self.calls = bad_call, 0

    def activate_impl(self) -> None: ...

    def deactivate_impl(self) -> None: ...

    def infer_impl(self, feed, sizes):
        value = math.nan if self.bad_call is not None and self.calls >= self.bad_call else 0.01
        self.calls += 1
        return {"noise_pred": torch.full_like(feed["sample"], value)}


FLOAT_INPUTS = [t.name for t in SPEC.inputs if t.dtype == "float32"]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(FLOAT_INPUTS), position=st.integers(0, 10**6), value=st.sampled_from(NON_FINITE))
def test_a_non_finite_feed_value_is_refused_naming_input_value_and_index(name, position, value):
    feed = valid_feed()
    flat = feed[name].view(-1)
    position %= flat.numel()
    flat[position] = value
    index = tuple(int(i) for i in np.unravel_index(position, feed[name].shape))
    with pytest.raises(InvalidInputError) as caught:
        SPEC.validate(feed)
    message = str(caught.value)
    assert f"input {name!r} holds 1 non-finite values (first: {value} at index {index})" in message
    assert "every value must be a finite number" in message


# no subnormals: once an ONNX Runtime session has set flush-to-zero, hypothesis refuses to draw them
@settings(max_examples=20, deadline=None)
@given(scale=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False))
def test_finite_feeds_pass(scale):
    feed = valid_feed()
    feed["sample"].fill_(scale)
    feed["encoder_hidden_states"].fill_(-scale)
    assert SPEC.validate(feed)["height"] == SPEC.dims["height"].opt


def test_numpy_feeds_are_checked_too():
    feed = {name: value.numpy() for name, value in valid_feed().items()}
    feed["timestep"][0] = np.inf
    with pytest.raises(InvalidInputError, match=r"'timestep' holds 1 non-finite values \(first: inf at index \(0,\)\)"):
        SPEC.validate(feed)


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_non_finite_guidance_is_refused(scale):
    for make in (
        lambda: SamplingSettings(guidance_scale=scale),
        lambda: InversionSettings(guidance_scale=scale),
    ):
        with pytest.raises(InvalidInputError, match=f"guidance_scale must be >= 1 and finite.*got {scale}"):
            make()
    with pytest.raises(InvalidInputError, match="eta must be >= 0 and finite, got inf"):
        SamplingSettings(eta=math.inf)


def test_steps_beyond_the_schedule_are_refused_before_any_work():
    with pytest.raises(
        InvalidInputError, match="steps=1001 exceeds the schedule's 1000 training timesteps; use at most"
    ):
        SamplingSettings(steps=1001)
    with pytest.raises(InvalidInputError, match="steps=10000 exceeds"):
        InversionSettings(steps=10_000)


def test_the_flag_keeps_the_first_bad_step_on_the_latents_device():
    watch = FirstNonFiniteStep("denoise", torch.device("cpu"))
    for step, value in enumerate([0.0, 1.0, math.nan, 2.0, math.inf]):
        watch.update(step, torch.full((2, 2), value))
    assert watch.first.device.type == "cpu" and watch.first.dim() == 0 and int(watch.first) == 2
    with pytest.raises(NumericalError, match=r"NaN or infinite at denoise step 2 \(of steps 0-4\)"):
        watch.check("steps 0-4")
    FirstNonFiniteStep("invert", torch.device("cpu")).check("steps 0-4")  # nothing bad: no error


@pytest.mark.parametrize("bad_call", [0, 3])
def test_denoise_names_the_first_bad_step_after_running_every_step(bad_call):
    runner = BreakingRunner(bad_call).activate()
    settings = SamplingSettings(steps=6, guidance_scale=3.0, start_step=1, progress=False)
    with pytest.raises(NumericalError) as caught:
        denoise(runner, build_scheduler("ddim"), clean_latents(), text_conditioning(), settings)
    assert f"at denoise step {1 + bad_call} (of steps 1-5)" in str(caught.value)
    assert "lower the guidance scale" in str(caught.value)
    assert runner.calls == 5  # the loop never stopped to read the flag: one host read, at the end


def test_denoise_and_invert_return_finite_latents_unchanged():
    runner = BreakingRunner().activate()
    latents = denoise(
        runner, build_scheduler("ddim"), clean_latents(), text_conditioning(), SamplingSettings(steps=3, progress=False)
    )
    assert torch.isfinite(latents).all()
    trajectory = invert(runner, build_scheduler("ddim_inverse"), clean_latents(), text_conditioning(),
                        InversionSettings(steps=3, progress=False))  # fmt: skip
    assert trajectory.shape[0] == 4 and torch.isfinite(trajectory).all()


def test_invert_names_its_stage():
    runner = BreakingRunner(bad_call=2).activate()
    with pytest.raises(NumericalError, match=r"at invert step 2 \(of steps 0-3\)"):
        invert(runner, build_scheduler("ddim_inverse"), clean_latents(), text_conditioning(),
               InversionSettings(steps=4, progress=False))  # fmt: skip


def test_a_hook_that_writes_nan_is_caught_at_its_step():
    def after_step(i, t, latents):
        if i == 2:
            latents[0, 0, 0, 0] = math.inf

    with pytest.raises(NumericalError, match="at denoise step 2"):
        denoise(BreakingRunner().activate(), build_scheduler("ddim"), clean_latents(), text_conditioning(),
                SamplingSettings(steps=5, progress=False), after_step=after_step)  # fmt: skip


def test_gradient_sampling_names_its_stage():
    def unet(sample, timestep, context):
        return sample * (math.nan if timestep[0] < 500 else 0.0)  # goes bad in the second half

    noise, context = clean_latents(1), torch.zeros(1, 8, 32)
    with pytest.raises(NumericalError, match=r"at gradient sampling step 2 \(of steps 0-3\)"):
        sample_with_grad(unet, build_scheduler("ddim"), noise, context, context, steps=4, guidance_scale=1.0)


def test_decoded_pixels_must_be_finite():
    def composer_giving(images):
        return SimpleNamespace(infer=lambda component, **inputs: {"images": images})

    latents = torch.zeros(1, 4, 8, 8)
    good = Composer.decode_latents(composer_giving(torch.full((1, 3, 16, 16), 3.0)), latents)
    assert torch.equal(good, torch.ones(1, 3, 16, 16))  # finite values are clamped as before
    for value in NON_FINITE:
        bad = torch.zeros(1, 3, 16, 16)
        bad[0, 1, 2, 3] = value
        with pytest.raises(NumericalError, match=r"VAE decoder gave NaN or infinite pixels.*fp32 engines"):
            Composer.decode_latents(composer_giving(bad), latents)


def test_an_attention_bias_may_hold_minus_infinity_but_not_nan():
    from vgrt.bench.attention_ops import attention_spec

    spec = attention_spec("float32", masked=True)
    sizes = spec.profile_sizes("min")
    feed = {t.name: torch.zeros(spec.shape(t, sizes)) for t in spec.inputs}
    feed["bias"].fill_(-math.inf)  # never attend: a meaning, not a fault
    spec.validate(feed)
    for value in (math.nan, math.inf):
        feed["bias"].view(-1)[0] = value
        with pytest.raises(InvalidInputError, match=f"'bias' holds 1 non-finite values.*first: {value}.*or -inf"):
            spec.validate(feed)
    feed["bias"].fill_(0.0)
    feed["q"].view(-1)[0] = -math.inf  # only the bias opts in
    with pytest.raises(InvalidInputError, match="'q' holds 1 non-finite values"):
        spec.validate(feed)


def test_pno_stops_at_a_non_finite_sampling_and_keeps_the_best_variables():
    from vgrt.runtime.methods.pno import LossTerms, PnoSettings, optimize

    class Objective:
        dtype, device = torch.float32, torch.device("cpu")
        calls = 0

        def __call__(self, context, noise, generator):
            self.calls += 1
            if self.calls == 3:  # the third evaluation (after two updates) samples NaN
                raise NumericalError("the latents became NaN or infinite at gradient sampling step 4")
            loss = (context**2).sum() + (noise**2).sum()
            return LossTerms(loss, -loss.detach(), torch.zeros(()))

    result = optimize(Objective(), torch.ones(1, 2, 4), torch.ones(1, 4, 2, 2), PnoSettings(iterations=5), False)
    assert result.stopped.startswith("at iteration 2 (after 2 updates), the latents became NaN")
    assert len(result.losses) == 2 and result.best == 1 and torch.isfinite(result.noise).all()


@pytest.mark.parametrize("seed", [-1, 2**64, 2**64 - 3])
def test_pno_seeds_stay_in_the_generators_range(seed):
    from vgrt.runtime.methods.pno import PnoSettings

    with pytest.raises(InvalidInputError, match=r"PNO seed.* must be a whole number in \[0, 2\*\*64 - 1\]"):
        PnoSettings(iterations=5, seed=seed)
