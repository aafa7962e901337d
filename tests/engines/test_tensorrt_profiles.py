"""TensorRT optimisation profiles come from the spec: one profile whose shapes are the spec's ranges.

The expected shapes are written out by hand from the presets' ShapeProfile (vgrt/models/presets.py) and
the UNet spec's axes (vgrt/export/spec.py), so a mistake in deriving them fails here.
"""

import pytest

from vgrt.export.spec import unet_spec
from vgrt.models.features import FEATURES
from vgrt.models.presets import get_preset

# tiny: batch (1, 2, 8), latent height/width (8, 16, 32), context (1, 77, 334), extra tokens (1, 4, 64),
# regions (1, 2, 8), groups (1, 2, 4), mutual rows (1, 1, 8); 4 latent channels, 32-d context, 16 blocks x 2 gated features.
TINY_ALL_FEATURES = {
    "sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32)),
    "timestep": ((1,), (2,), (8,)),
    "encoder_hidden_states": ((1, 1, 32), (2, 77, 32), (8, 334, 32)),
    "key_mask": ((1, 1), (2, 77), (8, 334)),
    "extra_tokens": ((1, 1, 32), (2, 4, 32), (8, 64, 32)),
    "extra_gate": ((1, 1, 8, 8), (2, 1, 16, 16), (8, 1, 32, 32)),
    "extra_key_tokens": ((1, 1, 32), (2, 4, 32), (8, 64, 32)),
    "region_masks": ((1, 1, 8, 8), (2, 2, 16, 16), (8, 8, 32, 32)),
    "token_regions": ((1, 1, 1), (2, 2, 4), (8, 8, 64)),
    "mutual_rows": ((1,), (1,), (8,)),
    "q_index": ((1, 1), (2, 1), (4, 8)),
    "kv_index": ((1, 1), (2, 1), (4, 8)),
    "self_key_masks": ((1, 1, 8, 8), (2, 1, 16, 16), (4, 8, 32, 32)),
    "self_out_gates": ((1, 1, 8, 8), (2, 1, 16, 16), (4, 8, 32, 32)),
    "layer_gates": ((16, 2), (16, 2), (16, 2)),
}

# sdxl, no features: batch (1, 2, 8), latent (64, 128, 160), context (77, 77, 154); 2048-d context,
# pooled 1280-d text embedding and 6 time ids.
SDXL_PLAIN = {
    "sample": ((1, 4, 64, 64), (2, 4, 128, 128), (8, 4, 160, 160)),
    "timestep": ((1,), (2,), (8,)),
    "encoder_hidden_states": ((1, 77, 2048), (2, 77, 2048), (8, 154, 2048)),
    "text_embeds": ((1, 1280), (2, 1280), (8, 1280)),
    "time_ids": ((1, 6), (2, 6), (8, 6)),
}

EXPECTED = {
    ("tiny", frozenset(FEATURES)): TINY_ALL_FEATURES,
    ("sdxl", frozenset()): SDXL_PLAIN,
}


def _spec(preset: str, features: frozenset[str]):
    return unet_spec(get_preset(preset), features, "float16", num_blocks=16)


@pytest.mark.parametrize("preset, features", EXPECTED, ids=[p for p, _ in EXPECTED])
def test_profile_holds_the_hand_derived_shapes(preset, features):
    assert _spec(preset, features).profile_shapes() == EXPECTED[preset, features]


@pytest.mark.parametrize("preset, features", EXPECTED, ids=[p for p, _ in EXPECTED])
def test_polygraphy_profile_holds_the_same_shapes(preset, features):
    pytest.importorskip("polygraphy", reason="polygraphy comes with vgrt[trt]")
    from vgrt.engines.tensorrt.profiles import profile_from_spec

    profile = profile_from_spec(_spec(preset, features))
    shapes = {name: (tuple(p.min), tuple(p.opt), tuple(p.max)) for name, p in profile.items()}
    assert shapes == EXPECTED[preset, features]
