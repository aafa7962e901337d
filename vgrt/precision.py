"""One name for an engine's arithmetic from export to run: `--precision fp32|fp16|bf16|int8|fp8`.

What each asks of the export, and the backends that run it:
- fp32: an fp32 export; every backend.
- fp16: an fp16 export (attention, softmax and normalisation kept in fp32); torch, onnxruntime, tensorrt
  (TensorRT builds strongly typed networks: its precision is the export's).
- bf16: the fp32 export, run in bf16 by OpenVINO's CPU plugin on CPUs with bf16 units (its inference
  precision), so the file and its cache key are the fp32 export's; the compiled model's key has it.
- int8: a UNet export calibrated on the methods' own UNet inputs by `vgrt calibrate`: onnxruntime and
  openvino run its CPU form (--target cpu), tensorrt its Q/DQ form (--target tensorrt); the other
  components run in fp32 on the CPU, fp16 on TensorRT.
- fp8: the same, TensorRT only (Hopper and Ada GPUs).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vgrt.errors import InvalidInputError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
BACKENDS_OF = {
    "fp32": ("torch", "onnxruntime", "openvino", "tensorrt"),
    "fp16": ("torch", "onnxruntime", "tensorrt"),
    "bf16": ("openvino",),
    "int8": ("onnxruntime", "openvino", "tensorrt"),
    "fp8": ("tensorrt",),
}
_EXPORT_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "fp32"}  # int8 and fp8 come from calibration
_CALIBRATED = "int8 and fp8 engines come from an export calibrated on your method's inputs: vgrt calibrate METHOD ..."
QUANTISED = ("int8", "fp8")  # the UNet from `vgrt calibrate`; the other components in `companion_dtype`


def default_precision(backend: str) -> str:
    """fp16 for TensorRT (what its fused kernels and the plugin are built for), fp32 elsewhere."""
    return "fp16" if backend == "tensorrt" else "fp32"


def check_precision(precision: str, backend: str | None = None, flag: str = "--precision") -> None:
    """Refuse an unknown precision, or one `backend` does not run, naming the backends that do."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown {flag} {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if backend is not None and backend not in BACKENDS_OF[precision]:
        raise InvalidInputError(
            f"{flag} {precision} does not run on the {backend} backend; it runs on: {', '.join(BACKENDS_OF[precision])}"
        )


def export_dtype(precision: str, flag: str = "--precision") -> str:
    """The dtype of the export an engine of `precision` is made from (fp32 or fp16)."""
    check_precision(precision, flag=flag)
    if precision not in _EXPORT_DTYPES:
        raise InvalidInputError(f"{flag} {precision}: {_CALIBRATED} --precision {precision} --out DIR")
    return _EXPORT_DTYPES[precision]


def companion_dtype(precision: str, backend: str) -> str:
    """The dtype of the exports that run beside a UNet quantised to `precision` (int8, fp8): the fp16 of
    TensorRT's engines, else fp32; for other precisions, `export_dtype(precision)`."""
    if precision not in QUANTISED:
        return export_dtype(precision)
    return "fp16" if backend == "tensorrt" else "fp32"


def precision_settings(precision: str, backend: str, calibrated: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The Composer settings that run `precision` on `backend`: the dtype of its exports and, for int8 and
    fp8, the UNet exports `vgrt calibrate` quantised (`calibrated`), each run in place of the UNet of its
    features. Refuses a precision the backend does not run, int8 or fp8 without `calibrated`, and
    `calibrated` with any other precision; the folders themselves are checked by
    vgrt.engines.engine_set.check_calibrated. OpenVINO's inference precision (bf16) is a runner option,
    set where the CPU is checked (vgrt.commands.compose.composer_options)."""
    check_precision(precision, backend)
    if (precision in QUANTISED) != bool(calibrated):
        raise InvalidInputError(
            f"--precision {precision} runs an export calibrated by `vgrt calibrate`: give its --out with --calibrated DIR"
            if precision in QUANTISED
            else f"--calibrated runs a quantised UNet, and --precision is {precision}: add --precision int8 (or fp8)"
        )
    return {"dtype": companion_dtype(precision, backend), "calibrated": tuple(map(Path, calibrated))}
