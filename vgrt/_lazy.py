"""Optional heavy dependencies load on first use, with an error that names the extra to install."""

import importlib
from functools import cache
from types import ModuleType

from vgrt.errors import MissingDependencyError

_EXTRA_OF = {
    "onnxruntime": "cpu",
    "onnx": "cpu",
    "onnxconverter_common": "cpu",
    "triton": "gpu",
    "tensorrt": "trt",
    "polygraphy": "trt",
}


def require(module: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError saying which vgrt extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRA_OF.get(module.split(".")[0], "cpu")
        raise MissingDependencyError(
            f"{module!r} is not installed but is needed here; install it with: pip install 'vgrt[{extra}]'"
        ) from err


@cache
def is_available(module: str) -> bool:
    """True when `module` can be imported; the answer is cached and nothing is imported twice."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
