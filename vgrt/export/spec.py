"""The export contract of a component: tensor names, dtypes, symbolic shapes and shape profiles.

One spec drives the exporter (dynamic axes), the manifest, the runners' input checks, example feeds
and TensorRT optimisation profiles, so names and shapes are written down exactly once.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vgrt.errors import InvalidInputError
from vgrt.models.features import FEATURES, GATED
from vgrt.models.presets import Preset, Range, pooled_text_dim

# An int is a fixed size; a str names a dynamic dimension of the spec ("height"), or, in outputs only,
# a multiple or fraction of one ("height*8", "height/8").
Dim = int | str


def resolve_dim(dim: Dim, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    for sign in ("*", "/"):
        if sign in dim:
            name, factor = dim.split(sign)
            return sizes[name] * int(factor) if sign == "*" else sizes[name] // int(factor)
    return sizes[dim]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[Dim, ...]
    doc: str = ""
    # For 0/1 masks and gates: the value range a feed must respect. For index tensors: the dim whose
    # size bounds the values (indices must lie in [0, size)).
    value_range: tuple[float, float] | None = None
    index_of: str | None = None
    # Floats must be finite; True lets -inf through where it means something (an additive attention bias:
    # never attend). NaN and +inf are refused always.
    negative_infinity: bool = False


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Range]
    multiple_of: dict[str, int] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def row_dims(self) -> frozenset[str]:
        """The dims that count batch rows: "batch", and the dim of every list of batch rows (a 1-D input with
        index_of="batch", as mutual_rows). Calls merge, and guidance halves stack, along these dims."""
        lists = {t.shape[0] for t in self.inputs if t.index_of == "batch" and len(t.shape) == 1}
        return frozenset({"batch", *lists})

    def row_axis(self, tensor: TensorSpec) -> int | None:
        """The axis of `tensor` along which its values are per batch row (see row_dims), or None."""
        rows = self.row_dims()
        return next((axis for axis, dim in enumerate(tensor.shape) if dim in rows), None)

    def shape(self, tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, sizes) for d in tensor.shape)

    def profile_sizes(self, which: str) -> dict[str, int]:
        """Sizes of every dynamic dim at 'min', 'opt' or 'max'."""
        return {name: getattr(r, which) for name, r in self.dims.items()}

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input, (min, opt, max) shapes: a TensorRT optimisation profile."""
        sizes = [self.profile_sizes(w) for w in ("min", "opt", "max")]
        return {t.name: tuple(self.shape(t, s) for s in sizes) for t in self.inputs}

    def validate(self, feed: dict[str, Any]) -> dict[str, int]:
        """Check names, types, dtypes, shapes, profile ranges, finite floats and value ranges; return the
        dynamic dim sizes."""
        self.check_types(feed)
        sizes: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            self._check_shape(t, feed[t.name], sizes)
        resolved = {dim: size for dim, (size, _) in sizes.items()}
        for t in self.inputs:
            self._check_values(t, feed[t.name], resolved)
        return resolved

    def sizes(self, feed: dict[str, Any]) -> dict[str, int]:
        """The dynamic dim sizes of a feed whose values were validated already: names, types, dtypes and
        ranks are checked (cheap, no host reads), shapes and values are not."""
        self.check_types(feed)
        sizes: dict[str, int] = {}
        for t in self.inputs:
            for dim, size in zip(t.shape, feed[t.name].shape):
                if isinstance(dim, str):
                    sizes.setdefault(dim, size)
        return sizes

    def check_types(self, feed: dict[str, Any]) -> None:
        """Names, value types (torch tensors or numpy arrays), dtypes and ranks; reads no values."""
        expected = {t.name for t in self.inputs}
        missing, unknown = sorted(expected - set(feed)), sorted(set(feed) - expected)
        if missing or unknown:
            raise InvalidInputError(
                f"{self.name} feed does not match the exported inputs: missing {missing or 'none'}, "
                f"unexpected {unknown or 'none'}; the inputs are {[t.name for t in self.inputs]}"
            )
        for t in self.inputs:
            value = feed[t.name]
            dtype = _dtype_name(value)
            if dtype is None:
                raise InvalidInputError(
                    f"{self.name} input {t.name!r} is a {type(value).__name__}, expected a torch tensor or numpy "
                    f"array of dtype {t.dtype} and shape {_fmt(t.shape)}; convert it with "
                    f"torch.as_tensor(value, dtype=torch.{t.dtype})"
                )
            if dtype != t.dtype:
                raise InvalidInputError(
                    f"{self.name} input {t.name!r} has dtype {dtype}, expected {t.dtype}; convert it with "
                    f".to(torch.{t.dtype}) (torch) or .astype(np.{t.dtype}) (numpy)"
                )
            if value.ndim != len(t.shape):
                raise InvalidInputError(
                    f"{self.name} input {t.name!r} has shape {tuple(value.shape)}, expected {len(t.shape)} axes "
                    f"{_fmt(t.shape)}"
                )

    def _check_shape(self, t: TensorSpec, value: Any, sizes: dict[str, tuple[int, str]]) -> None:
        for axis, (dim, size) in enumerate(zip(t.shape, tuple(value.shape))):
            if isinstance(dim, int):
                if size != dim:
                    raise InvalidInputError(
                        f"{self.name} input {t.name!r} has size {size} at axis {axis}, expected {dim} (shape {_fmt(t.shape)})"
                    )
                continue
            if dim in sizes and sizes[dim][0] != size:
                seen, where = sizes[dim]
                raise InvalidInputError(
                    f"{self.name} input {t.name!r} has {dim}={size} at axis {axis}, but {where} has {dim}={seen}; "
                    f"they must agree (shape {_fmt(t.shape)})"
                )
            if dim not in sizes:  # messages name the first input that fixed the size
                sizes[dim] = (size, repr(t.name))
                self._check_range(t, dim, size)

    def _check_range(self, t: TensorSpec, dim: str, size: int) -> None:
        r = self.dims[dim]
        if not r.min <= size <= r.max:
            raise InvalidInputError(
                f"{self.name} input {t.name!r} has {dim}={size}, outside the exported profile [{r.min}, {r.max}]; "
                f"use a size in range or export again with a profile that covers it"
            )
        multiple = self.multiple_of.get(dim, 1)
        if size % multiple:
            raise InvalidInputError(
                f"{self.name} input {t.name!r} has {dim}={size}, which is not a multiple of {multiple} (the UNet's "
                f"downsampling factor); use {size - size % multiple or multiple} or {size - size % multiple + multiple}"
            )

    def _check_values(self, t: TensorSpec, value: Any, sizes: dict[str, int]) -> None:
        if t.dtype.startswith(("float", "bfloat")):
            self._check_finite(t, value)
        if t.value_range is None and t.index_of is None:
            return
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if array.size == 0:
            return
        low, high = (0, sizes[t.index_of] - 1) if t.index_of else t.value_range
        seen_low, seen_high = array.min(), array.max()
        if not (low <= seen_low and seen_high <= high):
            raise InvalidInputError(
                f"{self.name} input {t.name!r} has values in [{seen_low}, {seen_high}], expected values in [{low}, {high}]"
            )

    def _check_finite(self, t: TensorSpec, value: Any) -> None:
        """NaN or infinity in a feed gives NaN outputs (a black image), so it is refused here."""
        if hasattr(value, "detach"):
            bad = value.isnan() | (value == float("inf")) if t.negative_infinity else ~value.isfinite()
            if not bool(bad.any()):
                return
            array = value.detach().float().cpu().numpy()
        else:
            array = np.asarray(value)
        bad = np.argwhere(np.isnan(array) | (array == np.inf) if t.negative_infinity else ~np.isfinite(array))
        if len(bad) == 0:
            return
        first = tuple(int(i) for i in bad[0])
        allowed = "a finite number or -inf" if t.negative_infinity else "a finite number"
        raise InvalidInputError(
            f"{self.name} input {t.name!r} holds {len(bad)} non-finite values (first: {array[first]} at index "
            f"{first}); every value must be {allowed}: check what produced this input"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [_tensor_json(t) for t in self.inputs],
            "outputs": [_tensor_json(t) for t in self.outputs],
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
            "multiple_of": self.multiple_of,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ComponentSpec":
        return cls(
            name=data["name"],
            inputs=tuple(_tensor_from_json(t) for t in data["inputs"]),
            outputs=tuple(_tensor_from_json(t) for t in data["outputs"]),
            dims={k: Range(*v) for k, v in data["dims"].items()},
            multiple_of=dict(data.get("multiple_of", {})),
        )


def _tensor_json(t: TensorSpec) -> dict[str, Any]:
    out = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "doc": t.doc}
    if t.value_range is not None:
        out["value_range"] = list(t.value_range)
    if t.index_of is not None:
        out["index_of"] = t.index_of
    if t.negative_infinity:
        out["negative_infinity"] = True
    return out


def _tensor_from_json(d: dict[str, Any]) -> TensorSpec:
    value_range = tuple(d["value_range"]) if "value_range" in d else None
    return TensorSpec(
        d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", ""), value_range, d.get("index_of"),
        bool(d.get("negative_infinity", False)),
    )  # fmt: skip


def _dtype_name(value: Any) -> str | None:
    """The numpy-style dtype name of a torch tensor or numpy array; None for anything else. Called per input
    of every step (spec.sizes), so it stays a few string operations."""
    if isinstance(value, np.ndarray):
        return value.dtype.name
    if type(value).__module__.startswith("torch") and hasattr(value, "dtype"):
        return str(value.dtype).removeprefix("torch.")
    return None


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def unet_spec(
    preset: Preset, features: frozenset[str], dtype: str, num_blocks: int, config: dict | None = None
) -> ComponentSpec:
    """The spec of a conditioned UNet of `preset` carrying `features`, with floats in `dtype`."""
    unknown = features - set(FEATURES)
    if unknown:
        raise InvalidInputError(f"unknown features {sorted(unknown)}")
    config = config or preset.unet
    p, ctx, channels = preset.profile, config["cross_attention_dim"], config["in_channels"]
    unit = (0.0, 1.0)
    latent = ("height", "width")
    inputs = [
        TensorSpec("sample", dtype, ("batch", channels, *latent), "noisy latents"),
        TensorSpec("timestep", dtype, ("batch",), "diffusion timestep per row"),
        TensorSpec("encoder_hidden_states", dtype, ("batch", "context", ctx), "text (and fused image) tokens"),
    ]
    if preset.is_sdxl:
        inputs += [
            TensorSpec("text_embeds", dtype, ("batch", pooled_text_dim(config)), "pooled text embedding (SDXL)"),
            TensorSpec("time_ids", dtype, ("batch", 6), "original size, crop, target size (SDXL)"),
        ]
    f = features
    if "key_mask" in f:
        inputs.append(TensorSpec("key_mask", dtype, ("batch", "context"), "1 = context token may be attended", unit))
    if "extra_tokens" in f:
        inputs += [
            TensorSpec(
                "extra_tokens", dtype, ("batch", "extra", ctx), "extra token set (values; keys too without kv_source)"
            ),
            TensorSpec("extra_gate", dtype, ("batch", 1, *latent), "per-query gate of the extra tokens' output", unit),
        ]
    if "kv_source" in f:
        inputs.append(TensorSpec("extra_key_tokens", dtype, ("batch", "extra", ctx), "key source of the extra tokens"))
    if "regions" in f:
        inputs += [
            TensorSpec("region_masks", dtype, ("batch", "regions", *latent), "1 = query inside region", unit),
            TensorSpec(
                "token_regions", dtype, ("batch", "regions", "extra"), "1 = extra token belongs to region", unit
            ),
        ]
    if "mutual" in f:
        inputs += _mutual_inputs(dtype)
    if any(g in f for g in GATED):
        inputs.append(
            TensorSpec(
                "layer_gates", dtype, (num_blocks, len(GATED)), f"per transformer block: {', '.join(GATED)} scale"
            )
        )
    used = {d for t in inputs for d in t.shape if isinstance(d, str)}
    # mutual_rows comes before batch so that tracing (sizes distinct in dims order) has fewer rows than batch
    ranges = {
        "mutual_rows": p.mutual_rows, "batch": p.batch, "height": p.latent, "width": p.latent, "context": p.context,
        "extra": p.extra_tokens, "regions": p.regions, "groups": p.groups,
    }  # fmt: skip
    outputs = [TensorSpec("noise_pred", dtype, ("batch", config["out_channels"], *latent), preset.prediction_type)]
    if "probes" in f:
        outputs.append(TensorSpec("attention_maps", dtype, ("batch", "regions", *latent), "attention share per region"))
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    return ComponentSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        dims={k: v for k, v in ranges.items() if k in used},
        multiple_of={"height": factor, "width": factor},
    )


def _mutual_inputs(dtype: str) -> list[TensorSpec]:
    """Mutual self-attention (vgrt.models.processors.SelfAttentionProcessor): every row attends to itself;
    only the rows listed in mutual_rows also read other rows. For the j-th listed row and group g, the
    queries of batch row q_index[g, j] attend to the keys and values of row kv_index[g, j] where
    self_key_masks[g, j] allows; the groups' outputs, weighted per query by self_out_gates[g, j], sum to
    the row's mutual attention, which layer_gates[block, mutual] blends with its plain attention."""
    latent = ("height", "width")
    per_group = ("groups", "mutual_rows")
    return [
        TensorSpec(
            "mutual_rows", "int64", ("mutual_rows",),
            "distinct batch rows whose self-attention reads other rows; the others attend to themselves only",
            index_of="batch",
        ),
        TensorSpec("q_index", "int64", per_group, "batch row whose queries group g of listed row j uses", index_of="batch"),
        TensorSpec("kv_index", "int64", per_group, "batch row whose keys/values group g of listed row j reads", index_of="batch"),
        TensorSpec("self_key_masks", dtype, (*per_group, *latent), "1 = key allowed in group g of listed row j", (0.0, 1.0)),
        TensorSpec("self_out_gates", dtype, (*per_group, *latent), "per-query weight of group g's output in listed row j", (0.0, 1.0)),
    ]  # fmt: skip
