"""MCA-Ctrl: backends agree, references follow their inversion, the target's background never reads
the subject, and bad requests fail before any engine runs."""

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from vgrt.errors import InvalidInputError
from vgrt.models.conditioning import Conditioning as LayerConditioning
from vgrt.models.processors import SelfAttentionProcessor
from vgrt.runtime.methods import mca_ctrl

from .inputs import box_mask, random_image


def request(mode: str = "edit", **changes) -> mca_ctrl.McaCtrlRequest:
    base = mca_ctrl.McaCtrlRequest(
        subject=random_image(1), subject_mask=box_mask(8, 24, 8, 24),
        condition=random_image(2), region_mask=box_mask(4, 16, 16, 28),
        mode=mode, prompt="a dog", steps=6, guidance_scale=7.5,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("mode", mca_ctrl.MODES)
def test_backends_give_the_same_latents(composers, mode):
    torch_result = mca_ctrl.compose(composers("torch"), request(mode))
    ort_result = mca_ctrl.compose(composers("onnxruntime"), request(mode))
    error = ((ort_result.latents - torch_result.latents).norm() / torch_result.latents.norm()).item()
    assert error <= 1e-4
    assert ort_result.image.shape == (1, 3, 32, 32)
    assert set(ort_result.times.seconds) == {"encode", "invert", "denoise", "decode"}


def test_reference_branches_follow_their_inversion(composers, monkeypatch):
    seen = {}
    real_invert, real_denoise = mca_ctrl.invert, mca_ctrl.denoise

    def spy_invert(*args, **kwargs):
        seen["trajectory"] = real_invert(*args, **kwargs)
        return seen["trajectory"]

    def spy_denoise(*args, before_step, **kwargs):
        def recording(i, t, latents, feed):
            before_step(i, t, latents, feed)
            seen.setdefault("rows", []).append(latents[:2].clone())

        return real_denoise(*args, before_step=recording, **kwargs)

    monkeypatch.setattr(mca_ctrl, "invert", spy_invert)
    monkeypatch.setattr(mca_ctrl, "denoise", spy_denoise)
    mca_ctrl.compose(composers("onnxruntime"), request())
    trajectory = seen["trajectory"]
    assert len(seen["rows"]) == 6
    for i, rows in enumerate(seen["rows"]):
        torch.testing.assert_close(rows, trajectory[-1 - i])


def test_target_background_never_reads_subject_keys():
    """On one self-attention layer with the method's own SALQ inputs: changing the subject branch
    changes the target inside the region and nowhere else."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    processor = SelfAttentionProcessor(frozenset({"mutual"}), block=0, factor=1)
    masks = {"subject": torch.zeros(4, 4), "region": torch.zeros(4, 4)}
    masks["subject"][1:3, 1:3] = 1
    masks["region"][:2, 2:] = 1
    groups = mca_ctrl._groups(2, fg=(2, 1), bg=(2, 0), masks=masks)
    cond = LayerConditioning(layer_gates=torch.tensor([[0.0, 1.0]]), **groups)
    hidden = torch.randn(3, 16, 32)
    with torch.no_grad():
        base = processor(attn, hidden, conditioning=cond)
        moved = hidden.clone()
        moved[1] += 3.0  # the subject branch
        changed = processor(attn, moved, conditioning=cond)
    inside = masks["region"].reshape(16) > 0
    torch.testing.assert_close(changed[2, ~inside], base[2, ~inside])
    assert (changed[2, inside] - base[2, inside]).abs().amax() > 1e-3
    torch.testing.assert_close(changed[0], base[0])  # the condition branch is not listed: it reads itself only
    assert not torch.allclose(base[2], AttnProcessor2_0()(attn, hidden)[2])  # the target is composed, not plain


def test_bad_requests_fail_before_any_engine_runs():
    from vgrt.runtime.composer import Composer

    class NoEngines(Composer):
        def runner(self, *args, **kwargs):
            raise AssertionError("an engine was opened")

    cases = [
        (request(mode="paint"), "unknown MCA-Ctrl mode 'paint'"),
        (request(subject_mask=torch.zeros(1, 1, 32, 32)), "subject mask is empty"),
        (request(region_mask=box_mask(0, 4, 0, 4, size=16)), r"condition mask has shape \(1, 1, 16, 16\)"),
        (request(condition=random_image(3, size=48), region_mask=box_mask(0, 8, 0, 8, size=48)), "same size"),
        (request(steps=0), "steps must be an integer >= 1"),
        (request(subject=random_image(1, 30), subject_mask=box_mask(0, 8, 0, 8, 30), condition=random_image(2, 30),
                 region_mask=box_mask(0, 8, 0, 8, 30)), "width 30 is not usable: it must be a multiple of 4"),
    ]  # fmt: skip
    composer = NoEngines.from_preset("tiny")
    for bad, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern):
            mca_ctrl.compose(composer, bad)
