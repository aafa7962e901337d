"""The runner interface every backend implements.

A runner owns one model's execution: `activate()` loads it, `infer(feed)` checks the feed against the
component's spec (before any work) and runs it, `deactivate()` releases it; runners are context
managers. Outputs are fresh tensors unless the runner was made with `reuse_outputs=True`, in which
case they are the runner's own buffers and are overwritten by the next call.
"""

from abc import ABC, abstractmethod
from typing import Any

import torch

from vgrt.errors import VgrtError
from vgrt.export.spec import ComponentSpec


class Runner(ABC):
    backend: str = ""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self.is_active = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, Any], validate: bool = True) -> dict[str, torch.Tensor]:
        """Run one call. `feed` maps input names to torch tensors or numpy arrays.

        validate=False skips the value checks (they read masks and indices on the host, a device sync on
        a GPU) for loops that validated the same feed once already; shapes are still resolved.
        """
        if not self.is_active:
            raise VgrtError(f"{type(self).__name__} is not active: call activate() or use it as a context manager")
        sizes = self.spec.validate(feed) if validate else self.spec.sizes(feed)
        return self.infer_impl({k: torch.as_tensor(v) for k, v in feed.items()}, sizes)

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]: ...
