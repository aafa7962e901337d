"""Device residency: proof on CPU tensors that a step loop neither reads device data nor copies it across.

On a GPU, a host read of a device tensor (`item`, `bool`, `float`, `tolist`, `numpy`, `cpu`) waits for
every kernel queued before it, and so does an op whose output size depends on the data (`nonzero`,
boolean-mask indexing); a host-to-device copy of pageable memory inside the loop costs a transfer per
step. Any of them turns an asynchronous step loop into a synchronous one. CI has no GPU, so
`ResidencyGuard` simulates one with real CPU tensors:

- The pipeline's device is `SIMULATED_DEVICE` (cpu:0, which torch runs as the CPU but which compares
  unequal to torch.device("cpu")), so a tensor made with `device=composer.device` or moved with
  `.to(composer.device)` is told apart from one pinned to the host. Such tensors, the runners' outputs
  and everything computed from them are device tensors (a flag each tensor carries); their `.device`
  reads as SIMULATED_DEVICE, so `device=x.device` follows them.
- Inside a step loop (`step_loop`, entered by the sampling, inversion and gradient-sampling loops) a
  host read of a device tensor, a data-dependent-shape op on one and a copy between host and device
  raise ResidencyError naming the op and the line. Host tensors are free to be read: the schedulers
  keep their timesteps on the host and test them with `bool`, as they do on a GPU.
- Everywhere under the guard, an op that mixes a device tensor with a host tensor of one or more
  dimensions raises, as it would on a GPU (0-dim host tensors mix, as torch allows).
- A runner call is the engine's business (`engine_call`, from vgrt.engines.base): the guard pauses
  inside it and marks what it returns as device tensors; in a step loop every feed entry must already
  be one. The PyTorch modules of the gradient steps are not paused: their parameters are device
  tensors (`pipeline`), so their forward passes inside a loop are checked like the loop's own code.

The guard watches the thread that entered it (torch function modes are per thread).

Without a guard, `step_loop`, `host_reads_allowed` and `engine_call` cost one context-variable lookup.

    with ResidencyGuard() as guard:
        with guard.pipeline(composer):
            mca_ctrl.compose(composer, request)
"""

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from vgrt.errors import VgrtError

SIMULATED_DEVICE = torch.device("cpu", 0)

_FLAG = "_vgrt_on_device"
_guard: ContextVar["ResidencyGuard | None"] = ContextVar("vgrt_residency_guard", default=None)
_loop: ContextVar[str | None] = ContextVar("vgrt_step_loop", default=None)
_reads_allowed: ContextVar[str | None] = ContextVar("vgrt_host_reads_allowed", default=None)

HOST_READS = frozenset(
    {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
     "__repr__", "__str__", "__format__"}
)  # fmt: skip
SYNCING_OPS = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"})
TRANSFERS = frozenset({"copy_", "__setitem__"})  # a copy between devices is legal outside a loop
_DEVICE_GETTER = torch.Tensor.device.__get__
_HERE = str(Path(__file__).resolve())
_TORCH = str(Path(torch.__file__).resolve().parent)


class ResidencyError(VgrtError):
    """A step loop read device data on the host, synced, or copied across devices (or an op mixed devices)."""


@contextmanager
def step_loop(name: str) -> Iterator[None]:
    """Mark a step loop: under a ResidencyGuard, host reads, syncs and cross-device copies inside it raise."""
    token = _loop.set(name)
    try:
        yield
    finally:
        _loop.reset(token)


@contextmanager
def host_reads_allowed(reason: str) -> Iterator[None]:
    """Deliberate host reads and copies inside a step loop (the first feed's validation, once): the guard
    lets them through; `reason` says why in the code that asks."""
    token = _reads_allowed.set(reason)
    try:
        yield
    finally:
        _reads_allowed.reset(token)


def engine_call(call: Callable[..., dict[str, torch.Tensor]], feed: dict[str, torch.Tensor], *args: Any):
    """`call(feed, *args)`, a runner's own work; under a guard its outputs are device tensors."""
    guard = _guard.get()
    if guard is None:
        return call(feed, *args)
    return guard.engine_call(call, feed, *args)


def is_on_device(tensor: torch.Tensor) -> bool:
    """Whether the guard counts `tensor` as living on the pipeline's device."""
    return getattr(tensor, _FLAG, False)


def _mark(tensor: torch.Tensor) -> torch.Tensor:
    setattr(tensor, _FLAG, True)
    return tensor


def _tensors(*trees: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(trees)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _describe(tensor: torch.Tensor) -> str:
    return f"{'device' if is_on_device(tensor) else 'host'} tensor {tuple(tensor.shape)}"


def _where() -> str:
    """The innermost caller outside torch and this module: file:line in function."""
    for frame in reversed(traceback.extract_stack()):
        path = str(Path(frame.filename).resolve())
        if path != _HERE and not path.startswith(_TORCH) and "contextlib" not in path:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "an unknown place"


class ResidencyGuard(TorchFunctionMode):
    """Raises ResidencyError where the code it watches would read, sync or copy across devices on a GPU.

    Args:
        device: the simulated pipeline device; tensors made on or moved to it are device tensors.
    """

    def __init__(self, device: torch.device = SIMULATED_DEVICE):
        super().__init__()
        self.device = device
        self._paused = 0
        self._token = None

    def __enter__(self) -> Self:
        self._token = _guard.set(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _guard.reset(self._token)

    @contextmanager
    def pipeline(self, composer: Any) -> Iterator[Any]:
        """`composer` as its methods see it under this guard: its device is the simulated one, and the
        modules it hands out live there (Composer.module's contract); both are undone on leaving."""
        device, module = composer.device, composer.module

        def module_on_device(component: str, features: str = "none") -> nn.Module:
            made = module(component, features)
            self.on_device(made)
            return made

        composer.device, composer.module = self.device, module_on_device
        try:
            yield composer
        finally:
            composer.device = device
            del composer.module  # the class's method again

    def on_device(self, *items: torch.Tensor | nn.Module) -> None:
        """Count these tensors, or these modules' parameters and buffers, as living on the device."""
        for item in items:
            for tensor in [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]:
                _mark(tensor)

    def engine_call(self, call: Callable[..., dict[str, torch.Tensor]], feed: dict[str, torch.Tensor], *args: Any):
        loop = _checked_loop()
        if loop is not None:
            for name, value in feed.items():
                if isinstance(value, torch.Tensor) and not is_on_device(value):
                    self._fail(f"the engine input {name!r}, a {_describe(value)}, is copied to the device", loop)
        self._paused += 1
        try:
            outputs = call(feed, *args)
        finally:
            self._paused -= 1
        for value in outputs.values():
            _mark(value)
        return outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        if func == _DEVICE_GETTER:
            return self.device if is_on_device(args[0]) else func(*args)
        name = getattr(func, "__name__", str(func))
        inputs = _tensors(args, kwargs)
        on_device = [t for t in inputs if is_on_device(t)]
        if name in ("to", "cpu", "cuda") and inputs and isinstance(args[0], torch.Tensor):
            return self._move(func, name, args, kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            return self._made_on(func, name, args, kwargs, inputs)
        loop = _checked_loop()
        if on_device:
            self._check_op(name, args, kwargs, inputs, on_device, loop)
        result = func(*args, **kwargs)
        if on_device:
            # An op writing in place keeps its destination where it is: into a host one it is a transfer
            # (copy_, __setitem__) or a mix, both checked above.
            written = args[0] if args else None
            for tensor in _tensors(result):
                if tensor is not written:
                    _mark(tensor)
            for tensor in _tensors(kwargs.get("out")):
                _mark(tensor)
        return result

    def _check_op(self, name: str, args, kwargs, inputs, on_device, loop: str | None) -> None:
        first = on_device[0]
        if loop is not None:
            if name in HOST_READS:
                self._fail(f"Tensor.{name} reads a {_describe(first)} on the host", loop)
            if name in SYNCING_OPS or (name == "where" and len(args) + len(kwargs) == 1):
                self._fail(f"{name} on a {_describe(first)} has a data-dependent size, so it syncs", loop)
            if name in ("__getitem__", "__setitem__", "index_put_") and _host_index(args[1]):
                self._fail(
                    f"Tensor.{name} indexes a {_describe(first)} with a boolean mask or a Python list, which "
                    "syncs or copies its index to the device every call; use slices, masked arithmetic or an "
                    "index tensor made on the device before the loop",
                    loop,
                )
        host = [t for t in inputs if not is_on_device(t) and t.dim() > 0]
        if not host:
            return
        if name in TRANSFERS:
            if loop is not None:
                self._fail(f"Tensor.{name} copies a {_describe(host[0])} into a {_describe(first)}", loop)
            return
        self._fail(
            f"{name} mixes a {_describe(first)} with a {_describe(host[0])}, which fails on a GPU; make the host "
            "one on the pipeline's device (device=composer.device) before the loop",
            loop,
        )

    def _move(self, func, name: str, args, kwargs):
        source = args[0]
        target = self._target(name, args[1:], kwargs)
        result = func(*args, **kwargs)
        if target is None:  # a dtype change: stays where it is
            if is_on_device(source):
                _mark(result)
            return result
        to_device = target == self.device
        if to_device != is_on_device(source):
            loop = _checked_loop()
            if loop is not None:
                direction = "to the device" if to_device else "to the host"
                self._fail(f"Tensor.{name} copies a {_describe(source)} {direction}", loop)
            if result is source and not isinstance(source, nn.Parameter):
                result = source.clone()  # a move makes a new tensor on a GPU; a Parameter moves in place (Module.to)
        if to_device:
            _mark(result)
        elif result is not source:
            result.__dict__.pop(_FLAG, None)
        return result

    def _target(self, name: str, rest, kwargs) -> torch.device | None:
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda":
            return torch.device("cuda")
        other = next((a for a in (*rest, kwargs.get("other")) if isinstance(a, torch.Tensor)), None)
        if other is not None:
            return self.device if is_on_device(other) else other.device
        options = {k: v for k, v in kwargs.items() if k not in ("copy", "non_blocking", "memory_format")}
        device = torch._C._nn._parse_to(*rest, **options)[0]
        return None if device is None else torch.device(device)

    def _made_on(self, func, name: str, args, kwargs, inputs):
        to_device = torch.device(kwargs["device"]) == self.device
        loop = _checked_loop()
        copied = [t for t in inputs if is_on_device(t) != to_device]
        if loop is not None and copied:
            direction = "to the device" if to_device else "to the host"
            self._fail(f"{name}(device={kwargs['device']}) copies a {_describe(copied[0])} {direction}", loop)
        result = func(*args, **kwargs)
        for tensor in _tensors(result):
            if to_device:
                _mark(tensor)
            else:
                tensor.__dict__.pop(_FLAG, None)
        return result

    def _fail(self, what: str, loop: str | None) -> None:
        scope = f"inside the {loop!r} step loop" if loop else "under the residency guard"
        raise ResidencyError(f"{what} {scope}, at {_where()}")


def _checked_loop() -> str | None:
    """The step loop being checked now: None outside loops and where host reads are allowed."""
    return _loop.get() if _reads_allowed.get() is None else None


def _host_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, list) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0) for p in parts
    )


__all__ = [
    "SIMULATED_DEVICE", "ResidencyError", "ResidencyGuard", "engine_call", "host_reads_allowed",
    "is_on_device", "step_loop",
]  # fmt: skip
