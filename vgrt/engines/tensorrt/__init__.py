"""TensorRT backend: engine build (`build_engine`), the engine cache, and the runner (`runner_from_export`).

Importing this package imports neither tensorrt nor polygraphy; every entry point that needs them
raises MissingDependencyError naming `pip install 'vgrt[trt]'`.
"""

_EXPORTS = {
    "BuildSettings": "vgrt.engines.tensorrt.settings",
    "build_engine": "vgrt.engines.tensorrt.build",
    "runner_from_export": "vgrt.engines.tensorrt.runner_from_export",
    "SharedDeviceMemory": "vgrt.engines.tensorrt.runner",
    "TrtRunner": "vgrt.engines.tensorrt.runner",
    "TrtSettings": "vgrt.engines.tensorrt.runner",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
