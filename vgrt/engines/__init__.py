"""Runners with one interface (torch, onnxruntime, openvino, tensorrt); `open_runner` opens any exported directory."""

import logging
from pathlib import Path
from typing import Any

from vgrt.errors import InvalidInputError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


def open_runner(directory: str | Path, component: str = "unet", backend: str = "onnxruntime", **settings: Any):
    """A runner (not yet active) for `component` of an exported directory on `backend`.

    The torch backend rebuilds the module from the manifest (preset and seed, or weights path) and
    checks that its weights hash matches the export, so both backends run the same model.
    Keyword settings go to the backend: OrtSettings fields for onnxruntime, OpenVinoSettings fields for
    openvino, device for torch, for tensorrt those of vgrt.engines.tensorrt.runner_from_export (the
    engine comes from `vgrt build`).
    """
    from vgrt.export.manifest import read_manifest

    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    check_settings(backend, settings)
    manifest = read_manifest(directory)
    manifest.check_backend(backend)  # an int8 export opens only on the backends its manifest names
    if backend in ("onnxruntime", "openvino"):
        _warn_if_int8_saturates(manifest)
    entry = manifest.component(component)
    if backend == "tensorrt":
        from vgrt.engines.tensorrt.runner_from_export import runner_from_export

        return runner_from_export(directory, component, **settings)
    if backend == "onnxruntime":
        from vgrt.engines.ort_runner import OrtRunner, OrtSettings

        return OrtRunner(manifest.path(entry), entry.spec, OrtSettings(**settings))
    if backend == "openvino":
        from vgrt.engines.openvino_runner import OpenVinoRunner, OpenVinoSettings

        return OpenVinoRunner(manifest.path(entry), entry.spec, entry.files, OpenVinoSettings(**settings))
    from vgrt.engines.torch_runner import TorchRunner
    from vgrt.models.rebuild import module_from_manifest

    module, dtype = module_from_manifest(manifest, component)
    return TorchRunner(module, entry.spec, dtype=dtype, **settings)


def _warn_if_int8_saturates(manifest) -> None:
    """An INT8 export with 8-bit weights runs, but inaccurately, on a CPU without int8 dot-product units
    (vgrt.calibration.int8.reduces_range): said once per open, not refused."""
    from vgrt.engines.cpu_features import read_cpu_features

    quantization = manifest.data.get("quantization") or {}
    if quantization.get("reduce_range") is False and read_cpu_features().int8 is False:
        log.warning(
            "%s has 8-bit int8 weights, which this CPU (no VNNI or AMX-INT8) adds in saturating int16: expect "
            "several times the calibrated error; quantise again here (vgrt calibrate --reduce-range)",
            manifest.directory,
        )


THREAD_SETTINGS = {"onnxruntime": "intra_op_threads", "openvino": "threads"}  # torch: torch.set_num_threads


def thread_settings(backend: str, threads: int) -> dict[str, int]:
    """The runner setting that gives `backend` `threads` threads (none for torch, whose count is global)."""
    return {THREAD_SETTINGS[backend]: threads} if backend in THREAD_SETTINGS else {}


def default_backend() -> str:
    """The CPU backend `vgrt compose` runs when none is named: OpenVINO where it is installed (it comes with
    `vgrt[cpu]`), the fastest CPU engine measured that meets fp32 parity (README, Performance), else
    ONNX Runtime."""
    import importlib.util

    return "openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"


def setting_names(backend: str) -> frozenset[str]:
    """The keyword settings `open_runner` passes on to `backend`'s runner."""
    import inspect
    from dataclasses import fields

    if backend == "onnxruntime":
        from vgrt.engines.ort_runner import OrtSettings

        return frozenset(f.name for f in fields(OrtSettings))
    if backend == "openvino":
        from vgrt.engines.openvino_runner import OpenVinoSettings

        return frozenset(f.name for f in fields(OpenVinoSettings))
    if backend == "torch":
        from vgrt.engines.torch_runner import TorchRunner

        given = {"self", "module", "spec", "dtype"}  # open_runner's: the module and its dtype come from the manifest
        return frozenset(inspect.signature(TorchRunner.__init__).parameters) - given
    from vgrt.engines.tensorrt.runner import TrtSettings
    from vgrt.engines.tensorrt.settings import BuildSettings

    build = {f.name for f in fields(BuildSettings)} - {"component"}  # the component is open_runner's argument
    return frozenset(build | {f.name for f in fields(TrtSettings)} | {"cache_dir", "shared_memory"})


def check_settings(backend: str, settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - setting_names(backend))
    if unknown:
        raise InvalidInputError(
            f"unknown {backend} runner setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the {backend} backend takes: {', '.join(sorted(setting_names(backend)))}"
        )
