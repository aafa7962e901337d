"""Runner stand-ins and inputs shared by the loop tests."""

import torch

from vgrt.runtime.conditioning import Conditioning

ROWS, TOKENS, CONTEXT_DIM, LATENT = 2, 8, 32, 16  # tiny preset: 32-d context, latents up to 32x32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def text_conditioning(rows: int = ROWS, seed: int = 0) -> Conditioning:
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(2, rows, TOKENS, CONTEXT_DIM, generator=generator)
    return Conditioning({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})


def clean_latents(rows: int = ROWS, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


class RecordingRunner:
    """Runs another runner and keeps a copy of every feed it was given, and the sample buffer's address."""

    def __init__(self, runner):
        self.runner, self.spec = runner, runner.spec
        self.feeds: list[dict[str, torch.Tensor]] = []
        self.sample_addresses: list[int] = []

    def infer(self, feed, validate=True):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        self.sample_addresses.append(feed["sample"].data_ptr())
        return self.runner.infer(feed, validate)
