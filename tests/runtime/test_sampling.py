"""The sampling loop: backend parity, seeds, guidance batching, hooks, phases and argument checks."""

import re

import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.sampling import Phase, SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler, set_timesteps

from .helpers import LATENT, ROWS, RecordingRunner, relative_error, text_conditioning

SHAPE = (ROWS, 4, LATENT, LATENT)


def sample(runner, kind="ddim", seed=0, conditioning=None, preset="tiny", **settings):
    """Latents drawn from `seed`, denoised with the same generator (it also drives eta noise)."""
    generator = torch.Generator().manual_seed(seed)
    latents = random_latents(SHAPE, generator)
    settings = SamplingSettings(**{"steps": 8, "guidance_scale": 5.0, "progress": False, **settings})
    scheduler = build_scheduler(kind, SchedulerSettings.for_preset(preset))
    return denoise(runner, scheduler, latents, conditioning or text_conditioning(), settings, generator=generator)


@pytest.mark.parametrize("kind", ["ddim", "dpmsolver++"])
def test_torch_and_onnxruntime_reach_the_same_latents(runners, kind):
    expected, got = (sample(runners[backend], kind) for backend in ("torch", "onnxruntime"))
    assert relative_error(got, expected) <= 1e-4


def test_a_seed_makes_a_run_reproducible_and_other_seeds_differ(runners):
    runner = runners["onnxruntime"]
    first, again, other = (sample(runner, seed=seed, eta=1.0) for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert relative_error(other, first) > 0.1


def test_eta_noise_comes_from_the_generator(runners):
    runner, latents = runners["onnxruntime"], random_latents(SHAPE, torch.Generator().manual_seed(0))
    settings = SamplingSettings(steps=4, guidance_scale=5.0, eta=1.0, progress=False)
    a, b = (
        denoise(
            runner,
            build_scheduler("ddim"),
            latents,
            text_conditioning(),
            settings,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (1, 2)
    )
    assert relative_error(a, b) > 1e-3


def test_guidance_one_runs_only_the_conditional_rows(runners):
    recording = RecordingRunner(runners["onnxruntime"])
    guided_off = sample(recording, guidance_scale=1.0)
    cond_only = sample(runners["onnxruntime"], guidance_scale=1.0, conditioning=Conditioning(text_conditioning().cond))
    assert torch.equal(guided_off, cond_only)
    assert {feed["sample"].shape[0] for feed in recording.feeds} == {ROWS}


def test_guidance_batches_both_halves_into_one_call_and_combines_them(runners):
    runner, conditioning, scale = runners["torch"], text_conditioning(), 5.0
    latents = random_latents(SHAPE, torch.Generator().manual_seed(3))
    recording = RecordingRunner(runner)
    settings = SamplingSettings(steps=1, guidance_scale=scale, progress=False)
    got = denoise(recording, build_scheduler("ddim"), latents, conditioning, settings)

    (feed,) = recording.feeds
    assert feed["sample"].shape[0] == 2 * ROWS
    assert torch.equal(feed["encoder_hidden_states"][:ROWS], conditioning.uncond["encoder_hidden_states"])
    assert torch.equal(feed["encoder_hidden_states"][ROWS:], conditioning.cond["encoder_hidden_states"])
    scheduler = build_scheduler("ddim")
    set_timesteps(scheduler, 1)
    (t,) = scheduler.timesteps
    timestep = torch.full((ROWS,), float(t))
    uncond, cond = (
        runner.infer({"sample": latents, "timestep": timestep, "encoder_hidden_states": half["encoder_hidden_states"]})[
            "noise_pred"
        ]
        for half in (conditioning.uncond, conditioning.cond)
    )
    expected = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
    assert relative_error(got, expected) <= 1e-5


def test_hooks_run_once_per_step_and_their_edits_reach_the_unet(runners):
    recording, steps, before, after = RecordingRunner(runners["onnxruntime"]), 5, [], []
    replacement = torch.zeros(2 * ROWS, 3, 32)  # a per-step context the hook swaps in

    def before_step(i, t, latents, feed):
        before.append((i, int(t)))
        latents[0] = float(i)  # a reference branch overwritten every step
        feed["encoder_hidden_states"] = replacement + i

    def after_step(i, t, latents):
        after.append((i, int(t)))
        latents[1] = -1.0

    settings = SamplingSettings(steps=steps, guidance_scale=3.0, progress=False)
    scheduler = build_scheduler("ddim")
    final = denoise(recording, scheduler, random_latents(SHAPE, torch.Generator()), text_conditioning(), settings,
                    before_step=before_step, after_step=after_step)  # fmt: skip

    timesteps = [int(t) for t in scheduler.timesteps]
    assert before == after == list(zip(range(steps), timesteps))
    for i, feed in enumerate(recording.feeds):
        sample = feed["sample"]
        assert (sample[0] == i).all() and (sample[ROWS] == i).all()  # both guidance halves carry the row
        assert (sample[ROWS + 1] == -1.0).all() == (i > 0)  # after_step's edit is the next step's input
        assert torch.equal(feed["encoder_hidden_states"], replacement + i)
        assert torch.equal(feed["timestep"], torch.full((2 * ROWS,), float(timesteps[i])))
    assert (final[1] == -1.0).all()
    assert len(set(recording.sample_addresses)) == 1  # one sample buffer for the whole run


def test_sampling_can_start_mid_schedule(runners):
    seen = []
    scheduler = build_scheduler("dpmsolver++")
    settings = SamplingSettings(steps=10, start_step=6, guidance_scale=2.0, progress=False)
    denoise(runners["onnxruntime"], scheduler, random_latents(SHAPE, torch.Generator()), text_conditioning(), settings,
            before_step=lambda i, t, latents, feed: seen.append((i, int(t))))  # fmt: skip
    assert seen == [(i, int(scheduler.timesteps[i])) for i in range(6, 10)]


def test_a_phase_switches_the_unet_and_its_rows_and_keeps_the_multistep_history(runners):
    """Steps 3-5 run one conditional row of another runner, unguided. DPM-Solver++ keeps its history over
    the switch: this equals one run whose hook makes both guidance halves conditional from step 3 on."""
    runner, conditioning = runners["onnxruntime"], text_conditioning()
    first, later = RecordingRunner(runner), RecordingRunner(runner)
    latents = random_latents(SHAPE, torch.Generator().manual_seed(4))
    settings = SamplingSettings(steps=6, guidance_scale=5.0, progress=False)
    hook_rows = []

    def record_rows(i, t, latents, feed):
        hook_rows.append(feed["sample"].shape[0])

    phase = Phase(3, later, Conditioning(conditioning.cond), 1.0)
    got = denoise(first, build_scheduler("dpmsolver++"), latents, conditioning, settings,
                  before_step=record_rows, phases=[phase])  # fmt: skip
    assert [feed["sample"].shape[0] for feed in first.feeds] == [2 * ROWS] * 3
    assert [feed["sample"].shape[0] for feed in later.feeds] == [ROWS] * 3
    assert hook_rows == [2 * ROWS] * 3 + [ROWS] * 3  # the hook gets the feed of the UNet running its step
    assert torch.equal(later.feeds[0]["encoder_hidden_states"], conditioning.cond["encoder_hidden_states"])

    def same_halves_from_step_three(i, t, latents, feed):
        if i >= 3:
            feed["encoder_hidden_states"][:ROWS] = conditioning.cond["encoder_hidden_states"]

    expected = denoise(runner, build_scheduler("dpmsolver++"), latents, conditioning, settings,
                       before_step=same_halves_from_step_three)  # fmt: skip
    assert relative_error(got, expected) <= 1e-6
    guided_throughout = denoise(runner, build_scheduler("dpmsolver++"), latents, conditioning, settings)
    assert relative_error(got, guided_throughout) > 1e-3  # the switch changes the result: the check can fail


@pytest.mark.parametrize(("starts", "start_step"), [((0,), 0), ((2,), 2), ((6,), 0), ((4, 3), 0), ((3, 3), 0)])
def test_phase_starts_outside_the_run_or_out_of_order_are_refused_before_any_unet_call(runners, starts, start_step):
    recording = RecordingRunner(runners["onnxruntime"])
    phases = [Phase(start, recording, text_conditioning(), 2.0) for start in starts]
    settings = SamplingSettings(steps=6, start_step=start_step, progress=False)
    message = (
        f"phase start steps {list(starts)} must increase and lie between the run's start_step={start_step} and steps=6"
    )
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        denoise(recording, build_scheduler("ddim"), torch.zeros(SHAPE), text_conditioning(), settings, phases=phases)
    assert recording.feeds == []


def test_v_prediction_is_sampled_as_v(runners):
    v_run = sample(runners["onnxruntime"], preset="sd21")  # the tiny UNet's output read as v
    eps_run = sample(runners["onnxruntime"], preset="sd15")
    assert torch.isfinite(v_run).all()
    assert relative_error(v_run, eps_run) > 0.1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"guidance_scale": 0.5}, "guidance_scale must be >= 1"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"steps": 4, "start_step": 4}, r"start_step must lie in \[0, steps=4\)"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingSettings(**settings)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((ROWS, 4, 40, 40), r"height=40, outside the exported profile \[8, 32\]"),
        ((ROWS, 4, 16, 15), "not a multiple of 2"),
        ((ROWS, 3, 16, 16), "size 3 at axis 1, expected 4"),
        ((5, 4, 16, 16), r"\(5 latent rows x2 for classifier-free guidance\).*batch=10"),
        ((4, 16, 16), r"latents must be a float tensor \[batch, channels, height, width\]"),
    ],
)
def test_latents_the_unet_cannot_take_fail_before_any_unet_call(runners, shape, message):
    recording = RecordingRunner(runners["onnxruntime"])
    conditioning = text_conditioning(rows=shape[0] if len(shape) == 4 else ROWS)
    with pytest.raises(InvalidInputError, match=message):
        denoise(
            recording,
            build_scheduler("ddim"),
            torch.zeros(shape),
            conditioning,
            SamplingSettings(steps=2, progress=False),
        )
    assert recording.feeds == []


def test_guidance_needs_unconditional_inputs_and_eta_needs_ddim(runners):
    latents, runner = torch.zeros(SHAPE), runners["onnxruntime"]
    with pytest.raises(InvalidInputError, match="needs the unconditional inputs"):
        denoise(
            runner,
            build_scheduler("ddim"),
            latents,
            Conditioning(text_conditioning().cond),
            SamplingSettings(progress=False),
        )
    with pytest.raises(InvalidInputError, match="DPMSolverMultistepScheduler takes no eta"):
        denoise(
            runner,
            build_scheduler("dpmsolver++"),
            latents,
            text_conditioning(),
            SamplingSettings(eta=0.5, progress=False),
        )
