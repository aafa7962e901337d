"""The arithmetic of the gradient steps (PNO's, and the identity guidance of visual prompts): `fp32`, or
`bf16` autocast of the PyTorch modules' forward and backward passes.

Under bf16 autocast the modules' matrix products, convolutions and attention run in bf16; their parameters,
the variables being optimised and the optimiser's state stay fp32, and each module's output is cast back
to the variables' dtype, so what runs between module calls (the scheduler's update, the losses, the noise
regularizer's SVD) stays fp32 too. fp32 adds no context at all: the default arithmetic is exactly that of
a run without this setting.

bf16 pays only on bf16 units: a CPU with AVX512_BF16 or AMX-BF16 (elsewhere PyTorch emulates bf16, slower
than fp32), or a CUDA GPU that supports it (Ampere and newer); it is refused anywhere else. Even there it
is not always faster, so fp32 stays the default. On an Intel Xeon with AVX512_BF16 but no AMX (interleaved
runs, medians, a shared machine): PyTorch's bf16 matrix products ran at 0.56x the fp32 rate (1 thread), and
on SD 1.5 at 256x256 (2 threads) bf16 took 1.1-1.4x fp32's time in the UNet's gradient passes and 1.6-2.6x
in the decoder's and CLIP's: about 1.2x per PNO iteration, 2.6x per guidance step. The bf16 gradient stays
close to fp32's: on tiny, cosine similarity 0.9998 and relative error 0.7-2e-2 for a PNO step and for a
guidance step; the final latents of whole runs moved by 0.3-5e-3 (see tests/runtime/methods).
"""

from contextlib import AbstractContextManager, nullcontext

import torch

from vgrt.errors import InvalidInputError

GRADIENT_PRECISIONS = ("fp32", "bf16")
FLAG = "--gradient-precision"


def check_gradient_precision(precision: str, device: torch.device | str | None = None) -> None:
    """Refuse an unknown precision; with `device`, also bf16 where that device has no bf16 arithmetic."""
    if precision not in GRADIENT_PRECISIONS:
        raise InvalidInputError(
            f"unknown gradient precision {precision!r} ({FLAG}); choose one of: {', '.join(GRADIENT_PRECISIONS)}"
        )
    if precision == "bf16" and device is not None:
        _check_bf16_device(torch.device(device))


def _check_bf16_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise InvalidInputError(f"{FLAG} bf16 needs a GPU with bf16 support (Ampere or newer); use {FLAG} fp32")
        return
    if device.type != "cpu":
        raise InvalidInputError(f"{FLAG} bf16 runs on 'cpu' or 'cuda' devices, got {str(device)!r}; use {FLAG} fp32")
    from vgrt.engines.cpu_features import BF16_FLAGS, read_cpu_features

    features = read_cpu_features()
    if not features.bf16:  # None (instruction sets unknown) is refused too: bf16 may well be emulated there
        units = " or ".join(name.upper() for name in BF16_FLAGS)
        raise InvalidInputError(
            f"{FLAG} bf16 needs a CPU with bf16 units ({units}); this one has none that vgrt can find "
            f"({features.describe()}), so PyTorch would emulate bf16, slower than fp32; use {FLAG} fp32"
        )


def gradient_autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context the modules of a gradient step run in: bf16 autocast on `device`'s type for 'bf16',
    nothing for 'fp32'. Cast the modules' outputs back to the variables' dtype after leaving it."""
    check_gradient_precision(precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
