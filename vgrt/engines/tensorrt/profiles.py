"""TensorRT optimisation profiles from a component's spec: one profile whose ranges are the spec's."""

from vgrt._lazy import require
from vgrt.errors import ArtifactError
from vgrt.export.spec import ComponentSpec

Shape = tuple[int, ...]


def profile_shapes(spec: ComponentSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input, its (min, opt, max) shape; every dim checked to satisfy min <= opt <= max."""
    shapes = spec.profile_shapes()
    for name, (low, opt, high) in shapes.items():
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ArtifactError(
                f"{spec.name} input {name!r} has profile min {low}, opt {opt}, max {high}, not ordered "
                "min <= opt <= max; fix the preset's ranges and export again"
            )
    return shapes


def profile_from_spec(spec: ComponentSpec):
    """A Polygraphy `Profile` holding `profile_shapes(spec)`."""
    profile = require("polygraphy.backend.trt").Profile()
    for name, (low, opt, high) in profile_shapes(spec).items():
        profile.add(name, min=low, opt=opt, max=high)
    return profile
