"""ONNX Runtime runner: CPU execution provider by default, CUDA or TensorRT when present and asked for.

Inputs and outputs are bound by pointer through IOBinding, so a call copies nothing on the host. Each
call holds a per-call context from the runner's pool: an IO binding and, with `reuse_outputs`, one buffer
per output, made anew only when its shape changes. ONNX Runtime runs one session from many threads at
once when each has its own binding, so concurrent calls give the serial results (see vgrt.engines.base).

On CUDA the bindings point at torch's device tensors, and ONNX Runtime runs on a torch stream of the
runner's own (`user_compute_stream`; ONNX Runtime refuses the default stream's handle 0), ordered after
the caller's stream and before it by stream waits, with the end-of-run synchronisation turned off: a
call never waits on the host.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgrt._lazy import require
from vgrt.engines.base import Runner
from vgrt.engines.contexts import ContextPool
from vgrt.errors import MissingDependencyError, VgrtError
from vgrt.export.spec import ComponentSpec

_NUMPY_OF = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# provider setting -> execution providers in priority order (ONNX Runtime places what the first cannot run
# on the next). The TensorRT provider caches its engines beside the model.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session settings.

    Args:
        provider: 'cpu', 'cuda' or 'tensorrt'. A session whose requested provider did not load (ONNX
            Runtime then silently falls back to the next) is an error.
        device_id: the CUDA device of the 'cuda' and 'tensorrt' providers (the runner's `device`).
        intra_op_threads: threads per op; 0 lets ONNX Runtime choose (all cores).
        optimization_level: 'disable', 'basic', 'extended' (default) or 'all'. On the CPU 'all' costs
            15-20 s of session creation on SD 1.5 for no measured gain.
        reuse_outputs: return output buffers the runner keeps and overwrites on a later call (one caller
            only; see vgrt.engines.base). Off, each call writes into fresh tensors.
        allow_spinning: let idle ONNX Runtime threads spin for the next call. Off by default: vgrt runs
            torch work between engine calls in the same process, and spinning threads starve it.
        denormals_as_zero: flush denormal floats to zero on the CPU. Masked softmax rows underflow
            into denormals, which x86 handles slowly (SD 1.5 masked self-attention at 4096 tokens:
            280 -> 208 ms); the values lost are below 1e-38.
        memory_arena: keep ONNX Runtime's CPU memory arena. Off returns memory after each call, for
            processes that hold many sessions on a small machine.
    """

    provider: str = "cpu"
    device_id: int = 0
    intra_op_threads: int = 0
    optimization_level: str = "extended"
    reuse_outputs: bool = False
    allow_spinning: bool = False
    denormals_as_zero: bool = True
    memory_arena: bool = True


@dataclass
class OrtCall:
    """What one call binds: an IO binding of the session and, when outputs are reused, their buffers."""

    binding: Any  # onnxruntime.IOBinding
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.outputs.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self.outputs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: ComponentSpec, settings: OrtSettings = OrtSettings()):
        super().__init__(spec)
        if settings.optimization_level not in OPTIMIZATION_LEVELS:
            raise VgrtError(
                f"unknown optimization_level {settings.optimization_level!r}; choose one of: {', '.join(OPTIMIZATION_LEVELS)}"
            )
        if settings.provider not in PROVIDERS:
            raise VgrtError(f"unknown provider {settings.provider!r}; choose one of: {', '.join(PROVIDERS)}")
        self.path, self.settings = Path(path), settings
        self.device = torch.device("cpu") if settings.provider == "cpu" else torch.device("cuda", settings.device_id)
        self.session = self._stream = self._run_options = None
        self._calls = ContextPool(lambda: OrtCall(self.session.io_binding()))

    def activate_impl(self) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.settings.allow_spinning else "0"
        )
        options.add_session_config_entry(
            "session.set_denormal_as_zero", "1" if self.settings.denormals_as_zero else "0"
        )
        options.enable_cpu_mem_arena = self.settings.memory_arena
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.settings.optimization_level]
        wanted = PROVIDERS[self.settings.provider][0]
        if self.device.type == "cuda":
            self._check_gpu_provider(ort, wanted)
            self._stream = torch.cuda.Stream(self.device)
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.session = ort.InferenceSession(str(self.path), options, providers=self._providers())
        if wanted not in self.session.get_providers():
            raise VgrtError(
                f"ONNX Runtime fell back from {wanted} to {self.session.get_providers()}: it did not load "
                "(onnxruntime-gpu needs CUDA 13 and cuDNN 9, its TensorRT provider also TensorRT's libraries); "
                "install 'vgrt[gpu]' or 'vgrt[trt]' with matching CUDA libraries, or use provider='cpu'"
            )

    def _check_gpu_provider(self, ort, wanted: str) -> None:
        """Refuse before loading the model: a provider this onnxruntime lacks, or no GPU for it."""
        if wanted not in ort.get_available_providers():
            package = "TensorRT with: pip install 'vgrt[trt]'" if wanted.startswith("Tensorrt") else "'vgrt[gpu]'"
            raise MissingDependencyError(
                f"this onnxruntime ({ort.__version__}) has no {wanted}, only {ort.get_available_providers()}; "
                f"install onnxruntime-gpu and {package}, or use provider='cpu'"
            )
        if not torch.cuda.is_available():
            raise VgrtError(
                f"provider {self.settings.provider!r} needs a CUDA GPU, and torch {torch.__version__} sees none; "
                "use provider='cpu'"
            )

    def _providers(self) -> list:
        """Execution providers in priority order, the GPU ones with their options (device, stream)."""
        names = PROVIDERS[self.settings.provider]
        if self.device.type == "cpu":
            return list(names)
        cuda = {
            "device_id": self.settings.device_id,
            "has_user_compute_stream": "1",
            "user_compute_stream": str(self._stream.cuda_stream),
        }
        providers = [(name, cuda) if name == "CUDAExecutionProvider" else name for name in names]
        if self.settings.provider == "tensorrt":
            cache = str(self.path.parent / "ort-tensorrt")
            providers[0] = (
                names[0],
                {
                    **cuda,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                },
            )
        return providers

    def deactivate_impl(self) -> None:
        self._calls.clear()
        self.session = self._stream = self._run_options = None

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        with self._calls.acquire() as call:
            if self.device.type == "cpu":
                return self._run(call, feed, sizes)
            # Inputs are written on the caller's stream; ONNX Runtime runs on the runner's; outputs are the caller's.
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)
            outputs = self._run(call, feed, sizes)
            caller.wait_stream(self._stream)
            return outputs

    def _run(self, call: OrtCall, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        kept = []  # keeps contiguous copies alive until the run ends
        for name, value in feed.items():
            value = value.to(self.device).contiguous()
            kept.append(value)
            call.binding.bind_input(name, *self._where, _NUMPY_OF[value.dtype], tuple(value.shape), value.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            shape, dtype = self.spec.shape(t, sizes), getattr(torch, t.dtype)
            if self.settings.reuse_outputs:
                buffer = call.output(t.name, shape, dtype, self.device)
            else:
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
            call.binding.bind_output(t.name, *self._where, t.dtype, shape, buffer.data_ptr())
            outputs[t.name] = buffer
        self.session.run_with_iobinding(call.binding, self._run_options)
        return outputs

    @property
    def _where(self) -> tuple[str, int]:
        """IOBinding's (device type, device id) of the runner's tensors."""
        return self.device.type, self.device.index or 0
