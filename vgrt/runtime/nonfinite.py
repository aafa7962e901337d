"""Catch NaN or infinite latents in a step loop without a host read per step.

The flag lives on the latents' device and is updated by tensor ops only, so a GPU loop never syncs for
it; the loop reads it once when it ends, before anything decodes its latents.
"""

import torch

from vgrt.errors import NumericalError


class FirstNonFiniteStep:
    """The first step whose latents held NaN or infinity (-1: none so far), kept on `device`."""

    def __init__(self, stage: str, device: torch.device):
        self.stage = stage
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, step: int, latents: torch.Tensor) -> None:
        bad = ~torch.isfinite(latents.detach()).all()
        self.first = torch.where((self.first < 0) & bad, step, self.first)

    def check(self, steps: str) -> None:
        """Raise NumericalError if any step went bad (one host read); `steps` names the range that ran."""
        step = int(self.first)
        if step >= 0:
            raise NumericalError(
                f"the latents became NaN or infinite at {self.stage} step {step} (of {steps}), so no image is "
                "made from them; lower the guidance scale, use fp32 engines rather than fp16, or check the weights"
            )
