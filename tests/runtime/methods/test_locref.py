"""LocRef: backends agree, instance tokens act only inside their boxes, bad layouts fail early."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from vgrt.errors import InvalidInputError
from vgrt.models.conditioning import Conditioning as LayerConditioning
from vgrt.models.processors import CrossAttentionProcessor
from vgrt.runtime.images import Box
from vgrt.runtime.methods import locref

from .inputs import random_image


def request(**changes) -> locref.LocRefRequest:
    fields = {
        "prompt": "a dog and a cat", "references": (random_image(4, 40), random_image(5, 24)),
        "boxes": (Box(0, 0, 16, 16), Box(16, 12, 32, 32)), "width": 32, "height": 32, "steps": 4,
    }  # fmt: skip
    return locref.LocRefRequest(**{**fields, **changes})


def test_backends_give_the_same_latents(composers):
    expected = locref.compose(composers("torch"), request()).latents
    got = locref.compose(composers("onnxruntime"), request()).latents
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-4


def test_instance_tokens_act_only_inside_their_boxes():
    """One cross-attention layer fed the method's own layout inputs: moving instance 0's tokens changes
    the output inside box 0 only; outside every box the image tokens do nothing at all."""
    layout = locref.layout_inputs(request(), tokens_per_image=5, latent_hw=(4, 4))
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    processor = CrossAttentionProcessor(
        frozenset({"extra_tokens", "regions"}), block=0, factor=1, context_dim=16, inner_dim=32
    )
    hidden, text, tokens = torch.randn(1, 16, 32), torch.randn(1, 7, 16), torch.randn(1, 15, 16)

    def run(extra):
        cond = LayerConditioning(extra_tokens=extra, layer_gates=torch.ones(1, 2), **layout)
        with torch.no_grad():
            return processor(attn, hidden, text, conditioning=cond)[0]

    moved = tokens.clone()
    moved[:, :5] += 2.0  # instance 0
    base, changed = run(tokens), run(moved)
    box0 = layout["region_masks"][0, 0].reshape(16) > 0
    assert (changed[box0] - base[box0]).abs().amax() > 1e-3
    torch.testing.assert_close(changed[~box0], base[~box0])
    outside = layout["extra_gate"][0, 0].reshape(16) == 0
    assert outside.any()
    torch.testing.assert_close(run(tokens * 0 + 5.0)[outside], base[outside])


def test_bad_layouts_fail_early():
    cases = [
        (request(boxes=(Box(0, 0, 16, 16),)), "2 reference images but 1 boxes"),
        (request(boxes=(Box(0, 0, 16, 16), Box(20, 20, 40, 40))), "outside the 32x32 image"),
        (request(references=(), boxes=()), "at least one reference"),
        (
            request(
                references=(torch.zeros(3, 8, 8), random_image(1)),
            ),
            r"\[1, 3, H, W\]",
        ),
    ]
    for bad, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern):
            bad.validate()
