"""Optional heavy dependencies load on first use, with an error that names the extra to install."""

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


# Importing openvino sends a usage event to Google Analytics from a background thread (openvino_telemetry,
# on unless the user opted out). vgrt sends nothing anywhere, and that thread, importing modules while
# vgrt's benchmark fork server forked a child, left the child waiting forever on an import lock. OpenVINO
# falls back to its no-op stub when the telemetry package does not import, so it is hidden while openvino
# imports (only then: the package imports as usual afterwards).
_HIDDEN_WHILE_IMPORTING = {"openvino": "openvino_telemetry"}


@contextmanager
def telemetry_hidden(module: str) -> Iterator[None]:
    """While the block imports `module` for the first time, the telemetry package it would load (see
    _HIDDEN_WHILE_IMPORTING) does not import."""
    package = module.split(".")[0]
    hidden = _HIDDEN_WHILE_IMPORTING.get(package)
    if hidden is None or package in sys.modules or hidden in sys.modules:
        yield
        return
    sys.modules[hidden] = None  # `import openvino_telemetry` raises ImportError
    try:
        yield
    finally:
        if hidden in sys.modules and sys.modules[hidden] is None:
            del sys.modules[hidden]


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
        with telemetry_hidden(module):
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
        with telemetry_hidden(module):
            importlib.import_module(module)
    except ImportError:
        return False
    return True
