"""The runner interface every backend implements.

A runner owns one model's execution: `activate()` loads it, `infer(feed)` checks the feed against the
component's spec (before any work) and runs it, `deactivate()` releases it; runners are context
managers. Outputs are fresh tensors unless the runner was made with `reuse_outputs=True` (see below).

Threads: one runner may be called from any number of threads at once, and every call returns exactly
what the same call would return alone (bit for bit). State a call writes (output buffers, IO bindings,
execution contexts, streams, CUDA graphs) belongs to a per-call context from a `ContextPool`
(vgrt.engines.contexts), never to the runner, so concurrency costs a pool hand-off, not a lock around
the call. With `reuse_outputs=True` the returned tensors are a context's buffers: a later call that takes
the same context overwrites them, whichever thread makes it. That mode is for one caller that is done
with each output before its next call (a step loop); callers that share a runner leave it off.

`activate()` and `deactivate()` may race with each other and with calls: `deactivate()` refuses new
calls, waits for those in flight, then releases; a call on an inactive runner raises.
"""

import threading
from abc import ABC, abstractmethod
from typing import Any, Self

import torch

from vgrt.errors import VgrtError
from vgrt.export.spec import ComponentSpec
from vgrt.runtime.residency import engine_call


class Runner(ABC):
    backend: str = ""
    device: torch.device = torch.device("cpu")  # where its inputs are read and its outputs live; GPU runners override

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self.is_active = False
        self._lifecycle = threading.Lock()  # one activate() or deactivate() at a time
        self._calls_changed = threading.Condition()  # guards is_active and _in_flight
        self._in_flight = 0  # calls in flight

    def activate(self) -> Self:
        with self._lifecycle:
            if not self.is_active:
                self.activate_impl()
                with self._calls_changed:
                    self.is_active = True
        return self

    def deactivate(self) -> None:
        with self._lifecycle:
            with self._calls_changed:
                if not self.is_active:
                    return
                self.is_active = False  # refuse new calls, then let those in flight finish
                self._calls_changed.wait_for(lambda: self._in_flight == 0)
            self.deactivate_impl()

    def __enter__(self) -> Self:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, Any], validate: bool = True) -> dict[str, torch.Tensor]:
        """Run one call. `feed` maps input names to torch tensors or numpy arrays.

        validate=False skips the value checks (they read masks and indices on the host, a device sync on
        a GPU) for loops that validated the same feed once already; shapes are still resolved.
        """
        with self._calls_changed:
            if not self.is_active:
                raise VgrtError(f"{type(self).__name__} is not active: call activate() or use it as a context manager")
            self._in_flight += 1
        try:
            sizes = self.spec.validate(feed) if validate else self.spec.sizes(feed)
            return engine_call(self.infer_impl, {k: torch.as_tensor(v) for k, v in feed.items()}, sizes)
        finally:
            with self._calls_changed:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._calls_changed.notify_all()

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """One call on validated inputs; called from many threads at once (see the module docstring)."""


class RunnerWrapper(Runner):
    """An active runner around another, for tools that watch its calls (`vgrt bench compose` times them,
    `vgrt calibrate` records them): its lifecycle is the wrapped runner's; a subclass overrides
    `infer_impl` and calls `self.runner.infer_impl`, so the feed checks run once, in this wrapper."""

    def __init__(self, runner: Runner):
        super().__init__(runner.spec)
        self.runner = runner
        self.backend, self.device, self.is_active = runner.backend, runner.device, runner.is_active

    def activate_impl(self) -> None:
        self.runner.activate()

    def deactivate_impl(self) -> None:
        self.runner.deactivate()
