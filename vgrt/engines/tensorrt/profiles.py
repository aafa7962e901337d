"""TensorRT optimisation profiles from a component's spec: one profile whose ranges are the spec's.

Every dynamic dim of the spec is a Range (min <= opt <= max, checked when the spec is made), so each
input's (min, opt, max) shapes are ordered dim by dim.
"""

from vgrt._lazy import require
from vgrt.export.spec import ComponentSpec


def profile_from_spec(spec: ComponentSpec):
    """A Polygraphy `Profile` with, per input, the spec's (min, opt, max) shapes."""
    profile = require("polygraphy.backend.trt").Profile()
    for name, (low, opt, high) in spec.profile_shapes().items():
        profile.add(name, min=low, opt=opt, max=high)
    return profile
