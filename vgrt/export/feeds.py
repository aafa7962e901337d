"""Valid random inputs for an exported component: for tests, benchmarks and tracing."""

from pathlib import Path

import torch

from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def random_feed(spec: ComponentSpec, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of `spec` at `sizes` (default: the profile's opt sizes).

    Masks and gates are 0/1 or in [0, 1], indices lie in range, lists of rows (a 1-D index input along a
    dim of its own, as mutual_rows) hold distinct rows, timesteps lie in [0, 1000), and every region owns
    at least one token and one latent pixel, so no feature is a silent no-op.
    """
    sizes = sizes or spec.profile_sizes("opt")
    generator = torch.Generator().manual_seed(seed)
    feed = {}
    for t in spec.inputs:
        shape = spec.shape(t, sizes)
        dtype = _TORCH_DTYPES[t.dtype]
        if t.index_of and t.shape[0] != t.index_of and len(shape) == 1:
            value = _distinct_rows(t.name, shape[0], sizes[t.index_of], generator)
        elif t.index_of:
            value = torch.randint(0, sizes[t.index_of], shape, generator=generator)
        elif t.name == "timestep":
            value = torch.randint(0, 1000, shape, generator=generator).to(dtype)
        elif t.name in ("region_masks", "token_regions", "self_key_masks", "key_mask"):
            value = (torch.rand(shape, generator=generator) > 0.5).to(dtype)
            value.reshape(-1, shape[-1])[:, 0] = 1  # never an empty row: each region/key set is non-empty
        elif t.value_range is not None and not dtype.is_floating_point:
            value = torch.randint(int(t.value_range[0]), int(t.value_range[1]) + 1, shape, generator=generator)
        elif t.value_range is not None:
            low, high = t.value_range
            value = (low + (high - low) * torch.rand(shape, generator=generator)).to(dtype)
        elif t.name == "layer_gates":
            value = torch.ones(shape, dtype=dtype)
        else:
            value = torch.randn(shape, generator=generator).to(dtype)
        feed[t.name] = value
    return feed


def _distinct_rows(name: str, count: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    if count > rows:
        raise InvalidInputError(
            f"{name} lists {count} distinct rows of {rows}; give sizes with at most as many listed rows as rows"
        )
    return torch.randperm(rows, generator=generator)[:count]


def example_feed(directory: str | Path, component: str = "unet", seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid random inputs for `component` of an exported directory, at the profile's opt shapes."""
    from vgrt.export.manifest import read_manifest

    return random_feed(read_manifest(directory).component(component).spec, seed=seed)
