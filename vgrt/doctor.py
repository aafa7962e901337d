"""What this machine can run: each check returns (ok, detail), where detail is a version or the reason.

Checks import what they report on, so a version shown is one that loads, and a package that is installed
but broken says how it fails. A check that raises is reported as failed with the exception, never dropped.
"""

import importlib
import logging
import platform
from collections.abc import Callable
from types import ModuleType

from vgrt._lazy import telemetry_hidden

log = logging.getLogger(__name__)


def _import(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") when `name` imports, else (None, why): not installed, or installed but failing to load."""
    try:
        with telemetry_hidden(name):
            return importlib.import_module(name), ""
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == name:
            return None, "not installed"
        return None, f"installed but does not import: {err}"
    except (ImportError, OSError) as err:  # OSError: a wheel whose shared libraries do not load
        return None, f"installed but does not import: {type(err).__name__}: {err}"


def _torch() -> tuple[bool, str]:
    torch, why = _import("torch")
    if torch is None:
        return False, f"{why}: pip install 'vgrt[cpu]' (pins the CPU build)"
    return True, torch.__version__


def _gpu() -> tuple[bool, str]:
    torch, why = _import("torch")
    if torch is None:
        return False, f"unknown: torch is {why}"
    if not torch.cuda.is_available():
        return False, f"no CUDA device visible to torch {torch.__version__} (a CPU build, or no driver)"
    props = torch.cuda.get_device_properties(0)
    return True, f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"


def _onnxruntime() -> tuple[bool, str]:
    onnxruntime, why = _import("onnxruntime")
    if onnxruntime is None:
        return False, f"{why}: pip install 'vgrt[cpu]'"
    return True, f"{onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


def _onnxruntime_cuda() -> tuple[bool, str]:
    onnxruntime, why = _import("onnxruntime")
    if onnxruntime is None:
        return False, f"onnxruntime is {why}"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False, "CUDA provider not in this build: pip install 'vgrt[gpu]' (onnxruntime-gpu, CUDA 13, cuDNN 9)"
    return True, "CUDA provider available (sessions are checked for a silent CPU fallback)"


def _onnxruntime_tensorrt() -> tuple[bool, str]:
    onnxruntime, why = _import("onnxruntime")
    if onnxruntime is None:
        return False, f"onnxruntime is {why}"
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        return (
            False,
            "TensorRT provider not in this build: pip install 'vgrt[trt]' (onnxruntime-gpu with TensorRT libraries)",
        )
    return True, "TensorRT provider in this build (sessions are checked for a silent fallback)"


def _cpu() -> tuple[bool, str]:
    from vgrt.engines.cpu_features import read_cpu_features

    return True, read_cpu_features().describe()


def _openvino() -> tuple[bool, str]:
    openvino, why = _import("openvino")
    if openvino is None:
        return False, f"{why}: pip install 'vgrt[cpu]'"
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return True, f"{openvino.__version__}, CPU plugin precisions: {', '.join(capabilities)}"


def _openvino_bf16() -> tuple[bool, str]:
    openvino, why = _import("openvino")
    if openvino is None:
        return False, f"openvino is {why}"
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return False, "this CPU has no bf16 units (AVX512_BF16 or AMX): OpenVINO would emulate bf16, slower than fp32"
    return True, "the CPU plugin runs bf16 on this CPU's bf16 units"


def _default_backend() -> tuple[bool, str]:
    from vgrt.engines import default_backend
    from vgrt.engines.cpu_features import read_cpu_features

    backend = default_backend()
    bf16 = read_cpu_features().bf16
    if backend == "openvino" and bf16:
        faster = (
            "; --precision bf16 runs on this CPU's bf16 units (error ~2e-2), faster or not by CPU (SD 1.5 UNet: 0.45x "
            "fp32 PyTorch's time on an AMD EPYC, 1.35x on an Intel Xeon without AMX): measure it with `vgrt bench "
            "unet --backends torch,openvino,openvino-bf16`"
        )
    elif backend == "openvino" and bf16 is False:
        faster = "; no bf16 units here, so fp32 is also the fastest precision"
    else:
        faster = ""
    return True, f"vgrt compose runs {backend} fp32 (the fastest CPU engine that meets fp32 parity){faster}"


def _triton() -> tuple[bool, str]:
    triton, why = _import("triton")
    return (True, triton.__version__) if triton else (False, f"{why}: pip install 'vgrt[gpu]'")


def _tensorrt() -> tuple[bool, str]:
    tensorrt, why = _import("tensorrt")
    if tensorrt is None:
        return False, f"{why}: pip install 'vgrt[trt]' (needs NVIDIA's library download to succeed)"
    return True, tensorrt.__version__


def _polygraphy() -> tuple[bool, str]:
    polygraphy, why = _import("polygraphy")
    if polygraphy is None:
        return False, f"{why}: pip install 'vgrt[trt]'"
    return True, f"{polygraphy.__version__} (builds TensorRT engines)"


def _plugin() -> tuple[bool, str]:
    ok, detail = _tensorrt()
    if not ok:
        return False, f"needs TensorRT ({detail})"
    ok, detail = _triton()
    if not ok:
        return False, f"needs Triton for its kernels ({detail})"
    from vgrt.plugins.masked_attention.trt_plugin import MASKED_ATTENTION, register_plugin

    plugin = register_plugin()
    return (
        True,
        f"{plugin} v{MASKED_ATTENTION.version} registers (JIT and AOT implementations; AOT PTX by Triton {detail})",
    )


CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {
    "python": lambda: (True, platform.python_version()),
    "torch": _torch,
    "cpu": _cpu,
    "gpu": _gpu,
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
    "openvino-bf16": _openvino_bf16,
    "default backend": _default_backend,
    "onnxruntime-cuda": _onnxruntime_cuda,
    "onnxruntime-tensorrt": _onnxruntime_tensorrt,
    "triton": _triton,
    "tensorrt": _tensorrt,
    "polygraphy": _polygraphy,
    "masked-attention plugin": _plugin,
}


def run_check(name: str) -> dict[str, object]:
    """One check's entry: {"ok", "detail"}; a check that raises is a failure whose detail is the exception
    (the traceback is logged at DEBUG, shown by `vgrt -v doctor`), so one broken install cannot hide the rest."""
    try:
        ok, detail = CHECKS[name]()
    except Exception as err:
        log.debug("the %s check raised", name, exc_info=True)
        return {"ok": False, "detail": f"check raised {type(err).__name__}: {err}"}
    return {"ok": ok, "detail": detail}


def collect() -> dict[str, dict[str, object]]:
    return {name: run_check(name) for name in CHECKS}
