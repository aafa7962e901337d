"""Object-level visual prompts: backends agree, segments and matching decide the layout, the identity
refinement lowers its loss, and bad input fails before any engine runs (nothing written)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vgrt.cli import main
from vgrt.errors import InvalidInputError
from vgrt.export.feeds import random_feed
from vgrt.runtime.images import Box
from vgrt.runtime.methods import visual_prompts as vp
from vgrt.runtime.methods.common import clip_pixels
from vgrt.runtime.methods.compositional_guidance import (
    GuidanceModules,
    IdentityGuidance,
    match_segments,
    segment_crops,
    segment_similarity,
    segments_from_maps,
)
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler, set_timesteps

from ..cpu import pretend_cpu
from ..helpers import relative_error
from .inputs import random_image


def request(**changes) -> vp.VisualPromptsRequest:
    fields = {
        "objects": (random_image(1, 40), random_image(2, 24)),
        "width": 32,
        "height": 32,
        "prompt": "a dog and a cat",
        "steps": 3,
        "guidance_steps": 2,
    }
    return vp.VisualPromptsRequest(**{**fields, **changes})


@pytest.fixture(scope="module")
def results(composers):
    return {backend: vp.compose(composers(backend), request()) for backend in ("torch", "onnxruntime")}


def test_backends_give_the_same_latents(results):
    expected, got = results["torch"], results["onnxruntime"]
    assert relative_error(got.latents, expected.latents) <= 1e-4
    assert got.assignment == expected.assignment and torch.equal(got.segments, expected.segments)
    assert list(got.times.seconds) == ["encode", "first_pass", "match", "guidance", "denoise", "decode"]
    assert [step.step for step in got.guidance] == [0, 1]
    assert all(step.torch_seconds > 0 and step.engine_seconds > 0 for step in got.guidance)
    assert sorted(got.assignment) == [0, 1] and got.segments.flatten(1).any(dim=1).all()


def test_probe_maps_and_adapters_match_across_backends(composers):
    reference, ort = composers("torch"), composers("onnxruntime")
    spec = ort.runner("unet", vp.FEATURES).spec
    feed = random_feed(spec, {**spec.profile_sizes("opt"), "extra": 6, "regions": 3}, seed=11)
    expected, got = reference.runner("unet", vp.FEATURES).infer(feed), ort.runner("unet", vp.FEATURES).infer(feed)
    assert relative_error(got["attention_maps"], expected["attention_maps"]) <= 1e-5
    assert relative_error(got["noise_pred"], expected["noise_pred"]) <= 1e-5
    for component, output in (("layout_adapter", "layout_tokens"), ("appearance_adapter", "appearance_tokens")):
        feed = random_feed(ort.runner(component).spec, seed=12)
        error = relative_error(
            ort.runner(component).infer(feed)[output], reference.runner(component).infer(feed)[output]
        )
        assert error <= 1e-5, component


def test_segments_follow_each_objects_strongest_attention():
    maps = torch.zeros(3, 4, 4)
    maps[0, :, :2], maps[0, :, 2:] = 0.8, 0.3  # object 0: strong on the left, some attention everywhere
    maps[1, :, 2:] = 0.2  # object 1: weaker than 0 even on the right, but that is where it peaks
    maps[1, 3, 3] = 0.05  # ... except one pixel, where nobody stands out: background
    maps[2, 0, 0] = 0.1  # object 2: wins nowhere, keeps its own peak
    segments = segments_from_maps(maps)
    right = torch.zeros(4, 4, dtype=torch.bool)
    right[:, 2:] = True
    right[3, 3] = False
    assert segments[0, :, :2].all() and not segments[0, :, 2:].any()
    assert torch.equal(segments[1], right)
    assert not segments[:, 3, 3].any()
    assert segments[2].sum() == 1 and segments[2, 0, 0]


def test_matching_assigns_each_object_one_segment():
    # Greedy choice would give both objects segment 0; the assignment is one-to-one and maximal.
    similarity = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.1, 0.2]])
    assert match_segments(similarity) == (1, 0)
    g = torch.Generator().manual_seed(0)
    planted = torch.randperm(5, generator=g)
    similarity = 0.2 * torch.rand(5, 5, generator=g)
    similarity[torch.arange(5), planted] += 1.0  # any other assignment loses at least two planted 1s
    assert match_segments(similarity) == tuple(planted.tolist())


def test_matching_finds_which_object_was_painted_where(composers):
    """Two objects painted into the halves of an image, swapped; CLIP crops of the halves match them back."""
    objects = request().objects
    encoder = composers("onnxruntime").runner("image_encoder")
    size = encoder.spec.input("pixel_values").shape[-1]
    references = encoder.infer({"pixel_values": torch.cat([clip_pixels(o, size) for o in objects])})["image_embeds"]
    image = torch.cat([F.interpolate(o, size=(32, 16), mode="bilinear") for o in objects[::-1]], dim=3)
    segments = torch.zeros(2, 16, 16, dtype=torch.bool)
    segments[0, :, :8], segments[1, :, 8:] = True, True
    embeds = encoder.infer({"pixel_values": segment_crops(image, segments, size)})["image_embeds"]
    assert match_segments(segment_similarity(embeds, references)) == (1, 0)


def identity_guidance(composer, lr=0.05, precision="fp32"):
    """(guidance of two objects on the halves of a 16x16 latent grid, latents, timestep), seeded."""
    modules = GuidanceModules(
        composer.module("unet", vp.GRADIENT_FEATURES), composer.module("vae_decoder"), composer.module("image_encoder")
    )
    g = torch.Generator().manual_seed(0)
    references = modules.image_encoder(torch.randn(2, 3, 32, 32, generator=g))[0]
    segments = torch.zeros(2, 16, 16, dtype=torch.bool)
    segments[0, :, :8], segments[1, :, 8:] = True, True
    inputs = {
        "encoder_hidden_states": torch.randn(1, 77, 32, generator=g), "extra_key_tokens": torch.randn(1, 16, 32, generator=g),
        "extra_gate": torch.ones(1, 1, 16, 16), "region_masks": segments[None].float(), "token_regions": vp.token_regions(2),
        "layer_gates": torch.ones(7, 2),
    }  # fmt: skip
    scheduler = build_scheduler("ddim", SchedulerSettings.for_preset("tiny"))
    set_timesteps(scheduler, 10)
    values = torch.randn(1, 16, 32, generator=g)
    guidance = IdentityGuidance(
        modules, inputs, values, references, segments, scheduler.alphas_cumprod, "epsilon", 32, lr, precision
    )
    return guidance, torch.randn(1, 4, 16, 16, generator=g), scheduler.timesteps[3]


def test_identity_refinement_lowers_the_loss(composers):
    guidance, latents, t = identity_guidance(composers("torch"))
    start = guidance.values.detach().clone()
    losses = [guidance.step(latents, t).item() for _ in range(3)]  # the loss stays on the device until read
    with torch.no_grad():
        losses.append(guidance.loss(latents, t).item())
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert not torch.equal(guidance.values, start)


def test_bf16_guidance_step_has_a_gradient_close_to_fp32s(composers, monkeypatch):
    pretend_cpu(monkeypatch, "avx512f", "avx512_bf16")  # the arithmetic is the same where bf16 is emulated
    gradients = {}
    for precision in ("fp32", "bf16"):
        guidance, latents, t = identity_guidance(composers("torch"), precision=precision)
        loss = guidance.step(latents, t)
        assert loss.dtype == guidance.values.dtype == torch.float32
        assert all(state.dtype == torch.float32 for state in guidance.optimizer.state[guidance.values].values())
        gradients[precision] = guidance.values.grad.flatten()
    fp32, bf16 = gradients["fp32"], gradients["bf16"]
    # Measured on tiny: relative error 1.9e-2, cosine 0.9998; rounding the inputs to bf16 once moves the fp32
    # gradient by 2.7e-3, another thread count by 1.1e-6.
    assert 2e-3 < relative_error(bf16, fp32) < 5e-2
    assert F.cosine_similarity(bf16, fp32, dim=0) > 0.999


def test_bf16_guidance_is_refused_before_any_engine_runs_on_a_cpu_without_it(tmp_path, monkeypatch):
    from vgrt.runtime.composer import Composer

    pretend_cpu(monkeypatch, "avx512f")
    with Composer.from_preset("tiny", cache=tmp_path, progress=False) as composer:
        with pytest.raises(InvalidInputError, match="--gradient-precision bf16 needs a CPU with bf16 units"):
            vp.compose(composer, request(gradient_precision="bf16"))
        with pytest.raises(InvalidInputError, match="unknown gradient precision 'fp16'"):
            vp.compose(composer, request(gradient_precision="fp16"))
    assert not any(tmp_path.iterdir())  # nothing was exported, so no engine ran


def test_bad_requests_fail_before_any_engine_runs(tmp_path):
    from vgrt.runtime.composer import Composer

    cases = [
        (request(boxes=(Box(0, 0, 16, 16), Box(4, 4, 12, 12))), "box 2 .* lies entirely inside box 1"),
        (request(boxes=(Box(0, 0, 16, 16), Box(0, 0, 16, 16))), "lies entirely inside"),
        (request(boxes=(Box(0, 0, 16, 16),)), "2 objects but 1 boxes"),
        (request(guidance_steps=4), r"guidance_steps must be an integer in \[0, steps=3\]"),
        (request(objects=(torch.zeros(3, 8, 8),)), r"object 1 must be an RGB tensor \[1, 3, H, W\]"),
        (
            request(objects=tuple(random_image(i, 8) for i in range(9))),
            "9 objects, but the exported profile takes at most 8",
        ),
    ]
    with Composer.from_preset("tiny", cache=tmp_path, progress=False) as composer:
        for bad, pattern in cases:
            with pytest.raises(InvalidInputError, match=pattern):
                vp.compose(composer, bad)
    assert not any(tmp_path.iterdir())  # nothing was exported, so no engine ran


def test_adapter_weights_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from vgrt.export.components import build_component
    from vgrt.models.source import ModelSource

    def adapter(**source):
        return build_component("appearance_adapter", ModelSource("tiny", **source), frozenset(), "float32").module

    trained = adapter(seed=9)
    (tmp_path / "appearance_adapter").mkdir()
    save_file(trained.state_dict(), tmp_path / "appearance_adapter" / "model.safetensors")
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter(weights=str(tmp_path))(tokens), trained(tokens))
        assert not torch.allclose(adapter(seed=0)(tokens), trained(tokens))


def test_from_the_command_line(tmp_path, composer_cache, capsys):
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(((random_image(i, 24)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(tmp_path / name)
    base = ["compose", "visual-prompts", "--object", str(tmp_path / "a.png"), "--object", str(tmp_path / "b.png"),
            "--steps", "2", "--guidance-steps", "1", "--cache", str(composer_cache)]  # fmt: skip
    assert main([*base, "--box", "0,0,20,32", "--box", "12,0,32,32", "--out", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)  # the tiny preset's native size
    assert "guidance" in capsys.readouterr().out
    (tmp_path / "notes.png").write_text("not an image")
    bad = [
        ([*base, "--object", str(tmp_path / "notes.png")], "is not a readable image"),
        ([*base, *(["--object", str(tmp_path / "a.png")] * 7)], "9 objects, but the exported profile takes at most 8"),
        ([*base, "--box", "0,0,16,16", "--box", "0,0,16,16"], "lies entirely inside"),
    ]
    for arguments, message in bad:
        assert main([*arguments, "--out", str(tmp_path / "bad.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
