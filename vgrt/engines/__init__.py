"""Runners with one interface (torch, onnxruntime, tensorrt) and `open_runner`, which opens any exported directory."""

from pathlib import Path
from typing import Any

from vgrt.errors import InvalidInputError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def open_runner(directory: str | Path, component: str = "unet", backend: str = "onnxruntime", **settings: Any):
    """A runner (not yet active) for `component` of an exported directory on `backend`.

    The torch backend rebuilds the module from the manifest (preset and seed, or weights path) and
    checks that its weights hash matches the export, so both backends run the same model.
    Keyword settings go to the backend: OrtSettings fields for onnxruntime, device for torch, for tensorrt
    those of vgrt.engines.tensorrt.runner_from_export (the engine comes from `vgrt build`).
    """
    from vgrt.export.manifest import read_manifest

    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    manifest = read_manifest(directory)
    entry = manifest.component(component)
    if backend == "tensorrt":
        from vgrt.engines.tensorrt.runner_from_export import runner_from_export

        return runner_from_export(directory, component, **settings)
    if backend == "onnxruntime":
        from vgrt.engines.ort_runner import OrtRunner, OrtSettings

        return OrtRunner(manifest.path(entry), entry.spec, OrtSettings(**settings))
    from vgrt.engines.torch_runner import TorchRunner
    from vgrt.models.rebuild import module_from_manifest

    module, dtype = module_from_manifest(manifest, component)
    return TorchRunner(module, entry.spec, dtype=dtype, **settings)
