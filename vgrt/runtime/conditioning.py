"""The UNet inputs other than (sample, timestep), for the conditional and the unconditional rows.

With classifier-free guidance one UNet call carries both: rows [0, B) are unconditional, rows
[B, 2B) conditional (the diffusers order). Each half is written as if it were alone, and stacking
relabels it: index inputs that point at batch rows (mutual_rows, q_index, kv_index) of the conditional half
are shifted by B, so a method's row wiring holds unchanged inside each half. Inputs per batch row stack
along their batch axis, inputs per listed row (q_index [groups, mutual_rows]) along the list's axis.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec, TensorSpec

LOOP_INPUTS = ("sample", "timestep")  # written by the loops every step


@dataclass(frozen=True)
class Conditioning:
    """Fixed UNet inputs for one run, each with a batch of B rows (one per latent row).

    Args:
        cond: every input except sample and timestep (encoder_hidden_states, masks, gates, ...).
        uncond: the unconditional half, needed when guidance_scale > 1; inputs it leaves out take
            the conditional value (often only encoder_hidden_states differs). Inputs with no batch
            axis (layer_gates) are shared and belong in cond only.
    """

    cond: Mapping[str, torch.Tensor]
    uncond: Mapping[str, torch.Tensor] = field(default_factory=dict)


def unet_inputs(
    spec: ComponentSpec, conditioning: Conditioning, rows: int, guided: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """The fixed part of the UNet feed (fresh tensors): cast once to the spec's dtypes, halves stacked when `guided`."""
    _check_names(spec, conditioning)
    if guided and not conditioning.uncond:
        raise InvalidInputError(
            "guidance_scale > 1 needs the unconditional inputs: give Conditioning(uncond={'encoder_hidden_states': ...})"
        )
    inputs = {}
    for name, cond in conditioning.cond.items():
        t = spec.input(name)
        cond = _as_spec_tensor(t, cond, device)
        if not guided:
            inputs[name] = cond
        elif spec.row_axis(t) is None:
            if name in conditioning.uncond:
                raise InvalidInputError(f"{name!r} has no batch axis, so both halves share it: give it in cond only")
            inputs[name] = cond
        else:
            uncond = _as_spec_tensor(t, conditioning.uncond[name], device) if name in conditioning.uncond else cond
            inputs[name] = _stack_halves(t, uncond, cond, rows, spec.row_axis(t))
    return inputs


def _check_names(spec: ComponentSpec, conditioning: Conditioning) -> None:
    allowed = [t.name for t in spec.inputs if t.name not in LOOP_INPUTS]
    for half, names in (("cond", conditioning.cond), ("uncond", conditioning.uncond)):
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise InvalidInputError(
                f"Conditioning.{half} has inputs {unknown} the UNet does not take (sample and timestep come from the "
                f"loop); its conditioning inputs are {allowed}"
            )
    only_uncond = sorted(set(conditioning.uncond) - set(conditioning.cond))
    if only_uncond:
        raise InvalidInputError(f"Conditioning.uncond has {only_uncond} but cond does not: give every input in cond")


def _as_spec_tensor(t: TensorSpec, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Always a copy: hooks edit the feed in place, and that must not reach the caller's tensors.
    return torch.as_tensor(value).to(device=device, dtype=getattr(torch, t.dtype), copy=True)


def _stack_halves(t: TensorSpec, uncond: torch.Tensor, cond: torch.Tensor, rows: int, axis: int) -> torch.Tensor:
    """The halves concatenated along `axis`, the batch axis or a list of rows' (ComponentSpec.row_axis)."""
    if t.index_of == "batch":
        cond = cond + rows
    return torch.cat([uncond, cond], dim=axis)
