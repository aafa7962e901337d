"""TensorRT optimisation profiles come from the spec: one profile whose shapes are the spec's ranges."""

import pytest

from vgrt.export.spec import unet_spec
from vgrt.models.features import FEATURES
from vgrt.models.presets import get_preset

PRESETS = ("tiny", "sd15", "sdxl")


def _spec(preset: str):
    return unet_spec(get_preset(preset), frozenset(FEATURES), "float16", num_blocks=16)


@pytest.mark.parametrize("preset", PRESETS)
def test_profile_covers_every_input_with_the_spec_ranges(preset):
    spec = _spec(preset)
    shapes = spec.profile_shapes()
    assert set(shapes) == {t.name for t in spec.inputs}
    for t in spec.inputs:
        low, opt, high = shapes[t.name]
        assert len(low) == len(opt) == len(high) == len(t.shape)
        for axis, dim in enumerate(t.shape):
            assert low[axis] <= opt[axis] <= high[axis]
            if isinstance(dim, int):
                assert low[axis] == opt[axis] == high[axis] == dim
            else:
                r = spec.dims[dim]
                assert (low[axis], opt[axis], high[axis]) == (r.min, r.opt, r.max)


@pytest.mark.parametrize("preset", PRESETS)
def test_polygraphy_profile_holds_the_same_shapes(preset):
    pytest.importorskip("polygraphy", reason="polygraphy comes with vgrt[trt]")
    from vgrt.engines.tensorrt.profiles import profile_from_spec

    spec = _spec(preset)
    profile = profile_from_spec(spec)
    assert {name: (tuple(p.min), tuple(p.opt), tuple(p.max)) for name, p in profile.items()} == spec.profile_shapes()
