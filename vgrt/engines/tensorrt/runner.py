"""TensorRT runner: one engine, per-call execution contexts with preallocated buffers, streams, CUDA graphs.

Per-call contexts: what a call uses (an execution context, one device buffer per input and output
sized for the profile's maximum shape and bound to it once, a stream, a CUDA graph) is a `TrtCall`,
held by one call at a time from the runner's pool (vgrt.engines.contexts), so calls from several
threads never share one; a call copies its inputs into its context's buffers and reads its outputs as
views, so the hot path allocates nothing (unless outputs are cloned, the default, see Runner). The pool
makes at most `TrtSettings.max_contexts` contexts (default 1): each holds its own buffers (and, without
shared memory, its own activation memory), and one SD UNet call already fills a GPU, so more contexts
cost memory for little throughput; further callers wait for a free one.

Streams: a call runs on its context's stream, ordered after the caller's current stream (input copies)
and before it (outputs), so calls compose with torch code without host synchronisation.

Shared activation memory: engines that never run at the same time can use one scratch buffer, as large
as the largest engine needs (`SharedDeviceMemory`). With threads, "never at the same time" is not a
promise a runner can keep: two runners sharing the buffer may be called by two threads at once, which
a per-runner limit cannot prevent. So the buffer orders its users itself: each execution is enqueued
while holding it and starts on the GPU after the previous holder's work ends (an event, no host wait).
Every context of every runner that shares it binds the same buffer; their GPU work is serialised.

CUDA graphs: with `cuda_graph=True`, each context keeps one graph per set of input shapes (a method's
step loop calls the UNet at one or two shapes: its guidance batch, an inversion batch). The first call
of a shape runs normally (TensorRT finishes its lazy set-up there), then captures that execution; every
later call of the shape replays it, on the same buffers. Capture synchronises the device once (torch's
`graph` does); replay never does. A new shared buffer drops a context's graphs (they hold the old
address). Capture is thread-local, so other threads' CUDA work does not invalidate it.

Device: `device` is the CUDA device the runner's buffers live on; inputs on another device (the host,
or a caller that has not moved them yet) are copied in as part of the call.

Every TensorRT call that reports failure by returning False raises instead.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vgrt.engines.base import Runner
from vgrt.engines.contexts import ContextPool
from vgrt.engines.tensorrt.library import logger, require_tensorrt
from vgrt.errors import ArtifactError, InvalidInputError, VgrtError
from vgrt.export.spec import ComponentSpec


@dataclass(frozen=True)
class TrtSettings:
    """Runtime settings of a TensorRT runner.

    Args:
        cuda_graph: capture one CUDA graph per set of input shapes, on its first call, and replay it after.
        reuse_outputs: return a context's own output buffers (overwritten by a later call; one caller
            only, see vgrt.engines.base).
        device: CUDA device index (the runner's `device` is cuda:<device>).
        max_contexts: execution contexts the runner makes for concurrent calls (each with its own
            buffers, stream and graph); further concurrent calls wait for one.
    """

    cuda_graph: bool = False
    reuse_outputs: bool = False
    device: int = 0
    max_contexts: int = 1


class SharedDeviceMemory:
    """One activation buffer for execution contexts whose work is ordered one after another on the GPU.

    Runners reserve what their engine needs; the buffer grows to the largest reservation, and each
    growth bumps `generation`, so that contexts bound to the old buffer rebind before their next call.
    Users enqueue their work inside `hold()`, which orders it after the previous holder's work.
    """

    def __init__(self, device: int = 0):
        self.device = device  # CUDA device index: runners on other devices cannot share the buffer
        self.buffer: torch.Tensor | None = None
        self.generation = 0
        self._lock = threading.Lock()
        self._last_use: torch.cuda.Event | None = None  # recorded after the last holder's work

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.buffer is None or self.buffer.numel() < size:
                if self._last_use is not None:
                    self._last_use.synchronize()  # the old buffer is freed below: its last user must be done
                self.buffer = _device_tensor(size, torch.uint8, self.device)
                self.generation += 1

    @contextmanager
    def hold(self, stream: torch.cuda.Stream, done: torch.cuda.Event) -> Iterator[torch.Tensor]:
        """The buffer, for work enqueued on `stream` inside the block; `done` is recorded after it."""
        with self._lock:
            if self._last_use is not None:
                stream.wait_event(self._last_use)
            yield self.buffer
            done.record(stream)
            self._last_use = done


ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


def shape_key(shapes: dict[str, tuple[int, ...]]) -> ShapeKey:
    """The key of a call's CUDA graph: its input shapes, in a hashable form."""
    return tuple(sorted(shapes.items()))


@dataclass
class TrtCall:
    """One call's state: an execution context with its bound buffers, its stream and its CUDA graph."""

    context: object  # tensorrt.IExecutionContext
    stream: torch.cuda.Stream
    done: torch.cuda.Event  # recorded after its work when it holds shared memory
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] | None = None  # the input shapes set on the context
    graphs: dict[ShapeKey, object] = field(default_factory=dict)  # torch.cuda.CUDAGraph per input shapes
    memory_generation: int = -1

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffers[name][: _numel(shape)].view(shape)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise VgrtError(f"TensorRT failed to {what}; its log above says why")


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(
        self,
        engine: Callable[[], object],
        spec: ComponentSpec,
        settings: TrtSettings = TrtSettings(),
        shared_memory: SharedDeviceMemory | None = None,
        needs_plugin: bool = False,
    ):
        """
        Args:
            engine: returns the serialized engine, verified (see `EngineCache.load`); called on activation.
            spec: the component's spec; inputs are validated against it and buffers sized by its profile.
            settings: see TrtSettings.
            shared_memory: activation memory shared with other runners, or None for each context's own.
            needs_plugin: the engine embeds the vgrt plugin (registered before deserializing).
        """
        super().__init__(spec)
        require_tensorrt()
        if settings.max_contexts < 1:
            raise InvalidInputError(f"max_contexts must be at least 1, got {settings.max_contexts}")
        if shared_memory is not None and shared_memory.device != settings.device:
            raise InvalidInputError(
                f"shared activation memory on cuda:{shared_memory.device} cannot serve a runner on "
                f"cuda:{settings.device}; make one SharedDeviceMemory per device"
            )
        self.device = torch.device("cuda", settings.device)
        self.engine_loader, self.settings = engine, settings
        self.shared_memory, self.needs_plugin = shared_memory, needs_plugin
        self.trt = self.runtime = self.engine = None
        self._calls: ContextPool[TrtCall] = ContextPool(self._new_call, settings.max_contexts)

    def activate_impl(self) -> None:
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise VgrtError("the TensorRT runner needs a CUDA GPU, and torch sees none")
        if self.needs_plugin:
            from vgrt.plugins.masked_attention.trt_plugin import register_plugin

            register_plugin()
        with torch.cuda.device(self.settings.device):
            self._load(trt)
            with self._calls.acquire():
                pass  # the first context now: its failures belong to activation, and a first call allocates nothing

    def _load(self, trt) -> None:
        self.trt, self.runtime = trt, trt.Runtime(logger())
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_loader())
        if self.engine is None:
            raise ArtifactError(
                "TensorRT could not deserialize the engine (built by another TensorRT version, or for another GPU?)"
            )
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {t.name for t in (*self.spec.inputs, *self.spec.outputs)}
        if names != expected:
            raise ArtifactError(
                f"the engine's tensors {sorted(names)} are not the export's {sorted(expected)}; build it again"
            )
        if self.shared_memory is not None:
            self.shared_memory.reserve(self.engine.device_memory_size_v2)

    def _new_call(self) -> TrtCall:
        trt = self.trt
        with torch.cuda.device(self.settings.device):
            if self.shared_memory is None:
                context = self.engine.create_execution_context()
            else:
                context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise VgrtError("TensorRT could not create an execution context (out of GPU memory?)")
            call = TrtCall(context, torch.cuda.Stream(self.settings.device), torch.cuda.Event())
            largest = self.spec.profile_sizes("max")
            for t in (*self.spec.inputs, *self.spec.outputs):
                dtype = _torch_dtypes(trt)[self.engine.get_tensor_dtype(t.name)]
                numel = max(1, _numel(self.spec.shape(t, largest)))
                call.buffers[t.name] = _device_tensor(numel, dtype, self.settings.device)
                _check(context.set_tensor_address(t.name, call.buffers[t.name].data_ptr()), f"bind tensor {t.name!r}")
        return call

    def deactivate_impl(self) -> None:
        for call in self._calls.clear():  # no call is in flight: Runner.deactivate waited for them
            call.stream.synchronize()
        self.trt = self.runtime = self.engine = None

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        with self._calls.acquire() as call:
            return self._run(call, feed, sizes)

    def _run(self, call: TrtCall, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        shapes = {t.name: self.spec.shape(t, sizes) for t in self.spec.inputs}
        caller = torch.cuda.current_stream(self.settings.device)
        for name, value in feed.items():
            call.view(name, shapes[name]).copy_(value, non_blocking=True)  # on the caller's stream
        if shapes != call.shapes:
            self._set_input_shapes(call, shapes)
        call.stream.wait_stream(caller)
        with self._memory(call), torch.cuda.stream(call.stream):
            self._launch(call, shape_key(shapes))
        caller.wait_stream(call.stream)
        outputs = {t.name: call.view(t.name, tuple(call.context.get_tensor_shape(t.name))) for t in self.spec.outputs}
        if self.settings.reuse_outputs:
            return outputs
        return {name: value.clone() for name, value in outputs.items()}

    def _launch(self, call: TrtCall, key: ShapeKey) -> None:
        """Replay the graph of these shapes; without one, execute, then capture a graph of the execution."""
        graph = call.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self._execute(call)  # the outputs of this call; TensorRT also finishes its lazy set-up here
        if self.settings.cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=call.stream, capture_error_mode="thread_local"):
                self._execute(call)  # recorded, not run
            call.graphs[key] = graph

    def _set_input_shapes(self, call: TrtCall, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not call.context.set_input_shape(name, shape):
                raise InvalidInputError(
                    f"TensorRT rejected input {name!r} of shape {shape}: outside the engine's optimisation profile; "
                    "build the engine from an export whose profile covers it"
                )
        call.shapes = shapes

    @contextmanager
    def _memory(self, call: TrtCall) -> Iterator[None]:
        """Hold the shared activation memory (if any) while the call's work is enqueued, bound to its context."""
        memory = self.shared_memory
        if memory is None:
            yield
            return
        with memory.hold(call.stream, call.done) as buffer:
            if memory.generation != call.memory_generation:
                call.context.set_device_memory(buffer.data_ptr(), buffer.numel())
                call.memory_generation = memory.generation
                call.graphs.clear()  # captured graphs hold the old buffer's address
            yield

    def _execute(self, call: TrtCall) -> None:
        _check(call.context.execute_async_v3(call.stream.cuda_stream), "execute the engine (execute_async_v3)")


def _device_tensor(numel: int, dtype: torch.dtype, device: int) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=f"cuda:{device}")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _torch_dtypes(trt) -> dict:
    return {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool,
    }  # fmt: skip
