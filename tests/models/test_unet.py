"""The conditioned UNet: features are off by construction when not exported, and on when fed."""

import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.export.feeds import random_feed
from vgrt.export.spec import unet_spec
from vgrt.models.features import FEATURES, parse_features
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.models.unet import build_unet, downsampling_factor, transformer_blocks

PLAIN_INPUTS = ("sample", "timestep", "encoder_hidden_states")


def unet_and_feed(features: str, seed: int = 4):
    module = build_unet(ModelSource("tiny"), parse_features(features))
    spec = unet_spec(get_preset("tiny"), module.features, "float32", module.num_blocks)
    return module, random_feed(spec, seed=seed)


def call(module, feed):
    with torch.no_grad():
        return module(**feed)


@pytest.fixture(scope="module")
def plain():
    return unet_and_feed("none")


def neutral(feed: dict) -> dict:
    """Inputs under which every feature must reproduce the plain UNet exactly."""
    out = dict(feed)
    for name in ("key_mask", "self_key_masks"):
        if name in out:
            out[name] = torch.ones_like(out[name])
    if "extra_gate" in out:
        out["extra_gate"] = torch.zeros_like(out["extra_gate"])
    if "mutual_rows" in out:  # every listed row's groups read the row itself
        groups = out["kv_index"].shape[0]
        out["kv_index"] = out["mutual_rows"].expand(groups, -1).contiguous()
        out["q_index"] = out["mutual_rows"].expand(groups, -1).contiguous()
        out["self_out_gates"] = torch.full_like(out["self_out_gates"], 1.0 / groups)
    return out


@pytest.mark.parametrize(
    "features", ["key_mask", "extra_tokens", "extra_tokens,kv_source", "extra_tokens,regions", "mutual", "all"]
)
def test_feature_is_neutral_when_switched_off_and_acts_when_on(plain, features):
    plain_module, plain_feed = plain
    module, feed = unet_and_feed(features)
    for name in PLAIN_INPUTS:
        feed[name] = plain_feed[name]
    reference = call(plain_module, plain_feed)
    torch.testing.assert_close(call(module, neutral(feed)), reference, rtol=1e-4, atol=1e-5)
    assert (call(module, feed) - reference).abs().amax() > 1e-3


def test_layer_gates_switch_features_per_block(plain):
    module, feed = unet_and_feed("extra_tokens,mutual")
    feed.update({k: plain[1][k] for k in PLAIN_INPUTS})
    on = call(module, feed)
    feed["layer_gates"] = torch.zeros_like(feed["layer_gates"])
    torch.testing.assert_close(call(module, feed), call(plain[0], plain[1]), rtol=1e-4, atol=1e-5)
    feed["layer_gates"][0] = 1.0  # only the first block
    partial = call(module, feed)
    assert (partial - on).abs().amax() > 1e-4


def test_block_indexing_and_factors():
    module, _ = unet_and_feed("none")
    blocks = transformer_blocks(module.unet)
    assert len(blocks) == module.num_blocks == 7  # 1 + 1 down, 1 mid, 2 + 2 up (up blocks have one more layer)
    levels = len(get_preset("tiny").unet["block_out_channels"])
    assert [downsampling_factor(b, levels) for b in blocks] == [1, 2, 2, 2, 2, 1, 1]


def test_seeded_weights_are_reproducible_and_features_do_not_change_them():
    a = build_unet(ModelSource("tiny", seed=7), frozenset()).unet.state_dict()
    b = build_unet(ModelSource("tiny", seed=7), frozenset(FEATURES)).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(("_extra.weight",)))


def test_unknown_feature_and_preset_are_named():
    with pytest.raises(InvalidInputError, match="'colour'.*key_mask"):
        parse_features("key_mask,colour")
    with pytest.raises(InvalidInputError, match="add 'extra_tokens'"):
        parse_features("regions")
    with pytest.raises(InvalidInputError, match="unknown preset 'sd3'.*tiny"):
        get_preset("sd3")
