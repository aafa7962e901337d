"""TensorRT runner: one engine, preallocated device buffers, an explicit stream, optional CUDA graphs.

Buffers: every input and output gets one device buffer sized for the profile's maximum shape, bound to
the execution context once at activation; a call copies its inputs into them and reads its outputs as
views, so the hot path allocates nothing (unless outputs are cloned, the default, see Runner).

Stream: the engine runs on the runner's own stream, ordered after the caller's current stream (input
copies) and before it (outputs), so calls compose with torch code without host synchronisation.

Shared activation memory: engines of a pipeline run one after another, so their scratch memory can be
one buffer, as large as the largest engine needs (`SharedDeviceMemory`).

CUDA graphs: with `cuda_graph=True`, a call whose input shapes equal the previous call's replays a
graph captured from that call's execution; a change of shapes (or of the shared memory) drops it.

Every TensorRT call that reports failure by returning False raises instead.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vgrt.engines.base import Runner
from vgrt.engines.tensorrt.library import logger, require_tensorrt
from vgrt.errors import ArtifactError, InvalidInputError, VgrtError
from vgrt.export.spec import ComponentSpec


@dataclass(frozen=True)
class TrtSettings:
    """Runtime settings of a TensorRT runner.

    Args:
        cuda_graph: capture a CUDA graph and replay it while input shapes stay the same.
        reuse_outputs: return the runner's own output buffers (overwritten by the next call).
        device: CUDA device index.
    """

    cuda_graph: bool = False
    reuse_outputs: bool = False
    device: int = 0


class SharedDeviceMemory:
    """One activation buffer for the execution contexts of engines that never run at the same time.

    Runners reserve what their engine needs; the buffer grows to the largest reservation, and each
    growth bumps `generation`, so that runners bound to the old buffer rebind before their next call.
    """

    def __init__(self, device: int = 0):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    def reserve(self, size: int) -> None:
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.uint8, device=f"cuda:{self.device}")
            self.generation += 1


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
            shared_memory: activation memory shared with other runners, or None for the engine's own.
            needs_plugin: the engine embeds the vgrt plugin (registered before deserializing).
        """
        super().__init__(spec)
        require_tensorrt()
        self.engine_loader, self.settings = engine, settings
        self.shared_memory, self.needs_plugin = shared_memory, needs_plugin
        self._reset()

    def _reset(self) -> None:
        self.runtime = self.engine = self.context = self.stream = self._graph = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None  # the input shapes set on the context
        self._previous_shapes: dict[str, tuple[int, ...]] | None = None  # those of the last call
        self._memory_generation = -1

    def activate_impl(self) -> None:
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise VgrtError("the TensorRT runner needs a CUDA GPU, and torch sees none")
        if self.needs_plugin:
            from vgrt.plugins.masked_attention.trt_plugin import register_plugin

            register_plugin()
        with torch.cuda.device(self.settings.device):
            self._load(trt)

    def _load(self, trt) -> None:
        self.runtime = trt.Runtime(logger())
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_loader())
        if self.engine is None:
            raise ArtifactError(
                "TensorRT could not deserialize the engine (built by another TensorRT version, or for another GPU?)"
            )
        if self.shared_memory is None:
            self.context = self.engine.create_execution_context()
        else:
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self.shared_memory.reserve(self.engine.device_memory_size_v2)
        if self.context is None:
            raise VgrtError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(self.settings.device)
        self._allocate_buffers(trt)

    def _allocate_buffers(self, trt) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {t.name for t in (*self.spec.inputs, *self.spec.outputs)}
        if names != expected:
            raise ArtifactError(
                f"the engine's tensors {sorted(names)} are not the export's {sorted(expected)}; build it again"
            )
        largest = self.spec.profile_sizes("max")
        for t in (*self.spec.inputs, *self.spec.outputs):
            dtype = _torch_dtypes(trt)[self.engine.get_tensor_dtype(t.name)]
            numel = max(1, _numel(self.spec.shape(t, largest)))
            self._buffers[t.name] = torch.empty(numel, dtype=dtype, device=f"cuda:{self.settings.device}")
            _check(self.context.set_tensor_address(t.name, self._buffers[t.name].data_ptr()), f"bind tensor {t.name!r}")

    def deactivate_impl(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._reset()

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._buffers[name][: _numel(shape)].view(shape)

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        shapes = {t.name: self.spec.shape(t, sizes) for t in self.spec.inputs}
        caller = torch.cuda.current_stream(self.settings.device)
        for name, value in feed.items():
            self._view(name, shapes[name]).copy_(value, non_blocking=True)  # on the caller's stream
        if shapes != self._shapes:
            self._set_input_shapes(shapes)
        self._bind_shared_memory()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            if self._graph is not None:
                self._graph.replay()
            elif self.settings.cuda_graph and shapes == self._previous_shapes:
                # The first call with new shapes ran normally (TensorRT finishes its lazy set-up there).
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=self.stream):
                    self._execute()
                self._graph.replay()
            else:
                self._execute()
        caller.wait_stream(self.stream)
        self._previous_shapes = shapes
        outputs = {t.name: self._view(t.name, tuple(self.context.get_tensor_shape(t.name))) for t in self.spec.outputs}
        if self.settings.reuse_outputs:
            return outputs
        return {name: value.clone() for name, value in outputs.items()}

    def _set_input_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self._graph = None
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise InvalidInputError(
                    f"TensorRT rejected input {name!r} of shape {shape}: outside the engine's optimisation profile; "
                    "build the engine from an export whose profile covers it"
                )
        self._shapes = shapes

    def _bind_shared_memory(self) -> None:
        memory = self.shared_memory
        if memory is None or memory.generation == self._memory_generation:
            return
        self.context.set_device_memory(memory.buffer.data_ptr(), memory.buffer.numel())
        self._memory_generation = memory.generation
        self._graph = None  # a captured graph holds the old buffer's address

    def _execute(self) -> None:
        _check(self.context.execute_async_v3(self.stream.cuda_stream), "execute the engine (execute_async_v3)")


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
