"""Optional heavy dependencies load on first use, with an error that names the extra to install."""

import importlib
from functools import cache
from types import ModuleType

from vgrt.errors import MissingDependencyError

# Top-level module -> the vgrt extra that installs it. A module not listed is a core dependency, which
# `vgrt[cpu]` installs too.
_EXTRA_OF = {
    "onnx": "cpu",
    "onnxscript": "cpu",
    "onnx_ir": "cpu",
    "onnxruntime": "cpu",
    "onnxconverter_common": "cpu",
    "matplotlib": "cpu",
    "openvino": "cpu",
    "triton": "gpu",
    "tensorrt": "trt",
    "polygraphy": "trt",
    "ray": "serve",
}


def missing_dependency(err: ModuleNotFoundError) -> MissingDependencyError | None:
    """The error naming the package and the extra to install when `err` is a third-party package missing;
    None when the missing module is vgrt's own (a bug, not an installation problem) or is not named."""
    package = (err.name or "").split(".")[0]
    if not package or package == "vgrt":
        return None
    return MissingDependencyError(
        f"the package {package!r} is not installed but is needed here; "
        f"install it with: pip install 'vgrt[{_EXTRA_OF.get(package, 'cpu')}]'"
    )


def require(module: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the package that is missing and the vgrt
    extra that provides it (the missing package may be one `module` itself imports)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        error = missing_dependency(err)
        if error is None:
            raise
        raise error from err
    except ImportError as err:  # installed, but it or a library it loads is broken
        extra = _EXTRA_OF.get(module.split(".")[0], "cpu")
        raise MissingDependencyError(
            f"{module!r} is installed but does not import ({err}); "
            f"reinstall it with: pip install --force-reinstall 'vgrt[{extra}]'"
        ) from err


@cache
def is_available(module: str) -> bool:
    """True when `module` can be imported; the answer is cached and nothing is imported twice."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
