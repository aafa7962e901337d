"""What this machine can run: each check returns (ok, detail), where detail is a version or the reason."""

import importlib.metadata
import platform
from collections.abc import Callable


def _version(package: str) -> tuple[bool, str]:
    try:
        return True, importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False, "not installed"


def _torch() -> tuple[bool, str]:
    ok, version = _version("torch")
    if not ok:
        return ok, "not installed: pip install 'vgrt[cpu]' (pins the CPU build)"
    return True, version


def _gpu() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA device visible to torch {torch.__version__} (a CPU build, or no driver)"
    props = torch.cuda.get_device_properties(0)
    return True, f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"


def _onnxruntime() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError:
        return False, "not installed: pip install 'vgrt[cpu]'"
    return True, f"{onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


def _onnxruntime_cuda() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False, "CUDA provider not in this build: pip install 'vgrt[gpu]' (onnxruntime-gpu, CUDA 13, cuDNN 9)"
    return True, "CUDA provider available (sessions are checked for a silent CPU fallback)"


def _triton() -> tuple[bool, str]:
    ok, version = _version("triton")
    return (True, version) if ok else (False, "not installed: pip install 'vgrt[gpu]'")


def _tensorrt() -> tuple[bool, str]:
    try:
        import tensorrt
    except ImportError:
        return False, "not installed: pip install 'vgrt[trt]' (needs NVIDIA's library download to succeed)"
    except OSError as err:  # the wheel installed but its shared libraries did not load
        return False, f"installed but its libraries do not load: {err}"
    return True, tensorrt.__version__


def _polygraphy() -> tuple[bool, str]:
    ok, version = _version("polygraphy")
    return (True, f"{version} (builds TensorRT engines)") if ok else (False, "not installed: pip install 'vgrt[trt]'")


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


def _onnxruntime_tensorrt() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError:
        return False, "onnxruntime is not installed"
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        return (
            False,
            "TensorRT provider not in this build: pip install 'vgrt[trt]' (onnxruntime-gpu with TensorRT libraries)",
        )
    return True, "TensorRT provider in this build (sessions are checked for a silent fallback)"


CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {
    "python": lambda: (True, platform.python_version()),
    "torch": _torch,
    "gpu": _gpu,
    "onnxruntime": _onnxruntime,
    "onnxruntime-cuda": _onnxruntime_cuda,
    "onnxruntime-tensorrt": _onnxruntime_tensorrt,
    "triton": _triton,
    "tensorrt": _tensorrt,
    "polygraphy": _polygraphy,
    "masked-attention plugin": _plugin,
}


def collect() -> dict[str, dict[str, object]]:
    report = {}
    for name, check in CHECKS.items():
        try:
            ok, detail = check()
        except Exception as err:  # a broken install must not stop the rest of the report
            ok, detail = False, f"check failed: {type(err).__name__}: {err}"
        report[name] = {"ok": ok, "detail": detail}
    return report
