"""Small synthetic images and masks for the method tests."""

import torch


def random_image(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def box_mask(y0: int, y1: int, x0: int, x1: int, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., y0:y1, x0:x1] = 1.0
    return mask
