"""A tiny-preset Composer per backend over one shared export cache, and small synthetic inputs."""

import pytest
import torch


@pytest.fixture(scope="session")
def composer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vgrt-cache")


@pytest.fixture(scope="session")
def composers(composer_cache):
    from vgrt.runtime.composer import Composer

    made = {}

    def get(backend: str):
        if backend not in made:
            made[backend] = Composer.from_preset("tiny", backend=backend, cache=composer_cache, progress=False)
        return made[backend]

    yield get
    for composer in made.values():
        composer.close()


def random_image(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def box_mask(y0: int, y1: int, x0: int, x1: int, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., y0:y1, x0:x1] = 1.0
    return mask
