"""The TensorRT library, imported on first use, and the logger every TensorRT object of the process shares."""

from functools import cache
from types import ModuleType

from vgrt.errors import MissingDependencyError

INSTALL_HINT = "pip install 'vgrt[trt]'"


def require_tensorrt() -> ModuleType:
    """Import tensorrt or raise MissingDependencyError saying what to install."""
    try:
        import tensorrt
    except ImportError as err:
        raise MissingDependencyError(
            f"TensorRT is not installed but is needed here; install it with: {INSTALL_HINT}"
        ) from err
    except OSError as err:  # the wheel is there but its shared libraries did not load
        raise MissingDependencyError(
            f"TensorRT is installed but its libraries do not load ({err}); reinstall it with: {INSTALL_HINT}"
        ) from err
    return tensorrt


@cache
def logger():
    """One logger for all builders and runtimes: TensorRT requires it to outlive every object logging to it."""
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)
