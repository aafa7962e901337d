"""TensorRT INT8 and FP8 UNet exports: explicit Q/DQ nodes in vgrt's own fp16 export, calibrated on a set.

TensorRT 10/11 takes INT8 and FP8 only from QuantizeLinear/DequantizeLinear pairs in the ONNX (strongly
typed networks; TensorRT 11 has no precision flags left), and only in their symmetric form: signed INT8
or FLOAT8E4M3FN with zero points of 0.

Route: ONNX Runtime's Q/DQ quantiser on vgrt's fp16 export, in that symmetric form (int8 activations per
tensor, min/max calibration; int8 weights per output channel; biases left in float: TensorRT has no INT32
dequantisation), Conv, MatMul and Gemm only; then, for FP8, a graph pass. Why this and not NVIDIA
ModelOpt's PyTorch quantisation:
- the Q/DQ nodes land in the export TensorRT builds, with its names, its fp16 casts and its
  vgrt::MaskedAttention nodes untouched (ModelOpt's ONNX exporter decomposes attention, and its ONNX extra
  pins an older onnx and onnxruntime-gpu); attention, softmax, masking and normalisation stay fp16, the
  masked attention with the plugin;
- the scales come from the captured feeds run through the fp16 export itself, and the per-layer SQNR
  fallback of the CPU INT8 (vgrt.calibration.sensitivity) applies unchanged;
- the quantiser's own reference, ONNX Runtime on the CPU, runs the very graph TensorRT gets, so it is
  proved without a GPU (ONNX Runtime's CPU kernels take INT8 and FLOAT8E4M3FN Q/DQ at opset 19+).
What it lacks: SmoothQuant (ONNX Runtime's needs Intel Neural Compressor) and demoDiffusion's percentile
calibration (ONNX Runtime's percentile calibrator fails on the fp16 export: its histogram cannot bin some
fp16 tensors), so min/max it is; a layer whose outliers cost it precision falls back to float by its SQNR.

FP8: ONNX Runtime calibrates FLOAT8E4M3FN only with its 'distribution' method, which fits each scale to a
tensor's spread and clips the UNet's outliers (error 0.18 on tiny, against 0.05 for INT8). FP8 is made from
the symmetric per-tensor calibration instead, as demoDiffusion does it the other way round: amax is the
INT8 scale x 127, the FP8 scale amax / 448 (E4M3's largest finite value), zero points become FLOAT8E4M3FN
zeros, and weights stay fp16 behind a Q/DQ pair of their own (TensorRT quantises them when it builds);
per-tensor weights, as demoDiffusion's FP8 config has them.
"""

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vgrt._lazy import require
from vgrt.calibration import DEFAULT_FP8_SQNR_THRESHOLD_DB, DEFAULT_SQNR_THRESHOLD_DB
from vgrt.calibration.dataset import CalibrationSet, read_set
from vgrt.calibration.int8 import (
    KEPT_IN_FLOAT,
    Int8Settings,
    Passes,
    QuantisationReport,
    fallback_passes,
    feed_reader,
    preprocessing_advice_dropped,
    quantise_with_fallback,
    split_feeds,
    write_quantised_manifest,
)
from vgrt.calibration.sensitivity import QUANTISED_OPS
from vgrt.errors import InvalidInputError
from vgrt.export.blobs import external_files, private_copy
from vgrt.export.manifest import read_manifest
from vgrt.export.spec import ComponentSpec
from vgrt.export.staging import atomic_directory, claimed_target

PRECISIONS = ("int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
FP8_MIN_OPSET = 19  # FLOAT8E4M3FN QuantizeLinear/DequantizeLinear


def default_sqnr_threshold_db(precision: str) -> float:
    return DEFAULT_FP8_SQNR_THRESHOLD_DB if precision == "fp8" else DEFAULT_SQNR_THRESHOLD_DB


@dataclass(frozen=True)
class TensorRtQdqSettings:
    """How `quantize_for_tensorrt` quantises.

    Args:
        precision: 'int8' or 'fp8'.
        sqnr_threshold_db: layers whose held-out SQNR is below it stay in fp16; None: no fallback;
            'default': `default_sqnr_threshold_db(precision)`.
        held_out, float_layers: as in vgrt.calibration.int8.Int8Settings.
    """

    precision: str = "int8"
    sqnr_threshold_db: float | None | str = "default"
    held_out: int = 4
    float_layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"TensorRT precision {self.precision!r} is not one of: {', '.join(PRECISIONS)}")
        self.fallback().validate()

    def fallback(self) -> Int8Settings:
        threshold = self.sqnr_threshold_db
        if threshold == "default":
            threshold = default_sqnr_threshold_db(self.precision)
        # SmoothQuant and int8 attention are the CPU INT8 path's so far: TensorRT's layers below the threshold
        # go to fp16, and its attention stays fp16
        return Int8Settings(threshold, self.held_out, self.float_layers, smoothquant_alphas=(), int8_attention=False)


def quantize_for_tensorrt(
    export_dir: str | Path,
    calibration: str | Path | CalibrationSet,
    out: str | Path,
    settings: TensorRtQdqSettings = TensorRtQdqSettings(),
    component: str = "unet",
    progress: bool = False,
) -> tuple[Path, QuantisationReport]:
    """Write a TensorRT INT8 or FP8 export of `component` of `export_dir` (an fp16 export) to `out`, calibrated
    on the captured feeds that fit its inputs; returns `out` and what was measured (on ONNX Runtime, CPU).
    `out` is replaced atomically when it is a vgrt export; anything else there is refused before any work.
    `progress`: a bar over the passes."""
    settings.validate()
    require("onnxruntime.quantization")
    manifest = read_manifest(export_dir)
    entry = manifest.component(component)
    if manifest.precision != "fp16":
        raise InvalidInputError(
            f"{str(export_dir)!r} is an {manifest.precision} export; TensorRT {settings.precision} is calibrated from "
            "an fp16 export (everything not quantised runs in its precision): export with --precision fp16"
        )
    calibration = calibration if isinstance(calibration, CalibrationSet) else read_set(calibration)
    calib, held = split_feeds(calibration, {t.name for t in entry.spec.inputs}, settings.held_out)
    calib, held = _in_spec_dtypes(calib, entry.spec), _in_spec_dtypes(held, entry.spec)
    out = Path(out)
    with claimed_target(out), atomic_directory(out) as staging, private_copy(manifest.path(entry)) as source:
        target = staging / entry.file

        def quantise(model: Path, float_layers: list[str]) -> None:
            quantise_symmetric(model, target, calib, float_layers, settings.precision)
            if settings.precision == "fp8":
                _rewrite(target, to_fp8)

        fallback = settings.fallback()
        with closing(Passes(fallback_passes(smoothing=False, finish=False), progress)) as passes:
            report = quantise_with_fallback(quantise, source, target, held, fallback, exact=True, passes=passes)
        report.calibration_samples = len(calib)
        scheme = _scheme(settings.precision)
        write_quantised_manifest(staging, manifest.data, component, entry.file, calibration, report, fallback, scheme)
    return out, report


def quantise_symmetric(
    source: Path, target: Path, feeds: list[dict[str, np.ndarray]], float_layers: list[str], precision: str
) -> None:
    """ONNX Runtime static Q/DQ of Conv, MatMul and Gemm in TensorRT's form: int8 symmetric activations per
    tensor (min/max); int8 symmetric weights, per output channel stored as int8 (precision 'int8') or per
    tensor behind a Q/DQ pair of fp16 weights (precision 'fp8', for `to_fp8`); biases in float."""
    quantization = require("onnxruntime.quantization")
    with preprocessing_advice_dropped():
        quantization.quantize_static(
            str(source), str(target), feed_reader(feeds), quant_format=quantization.QuantFormat.QDQ,
            per_channel=precision == "int8", op_types_to_quantize=list(QUANTISED_OPS),
            nodes_to_exclude=list(float_layers), activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8, calibrate_method=quantization.CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                "AddQDQPairToWeight": precision == "fp8",
            },
            use_external_data_format=bool(external_files(source)),  # above protobuf's 2 GB (SDXL in fp16)
        )  # fmt: skip


def to_fp8(model):
    """The symmetric INT8 Q/DQ `model` as FLOAT8E4M3FN Q/DQ: every scale x 127 / 448 (the same amax), every
    zero point a FLOAT8E4M3FN zero. Needs opset >= 19 and weights behind Q/DQ pairs (not stored as int8)."""
    from onnx import TensorProto, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < FP8_MIN_OPSET:
        raise InvalidInputError(f"FP8 Q/DQ needs opset >= {FP8_MIN_OPSET}; the model has opset {opset}: export again")
    float8 = require("ml_dtypes").float8_e4m3fn
    initializers = {t.name: t for t in model.graph.initializer}
    done = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        values, scale, zero = (initializers.get(name) for name in node.input[:3])
        if values is not None and values.data_type == TensorProto.INT8:
            raise InvalidInputError(
                f"{node.name} dequantizes weights stored as int8, which FP8 cannot take: quantise with Q/DQ pairs"
            )
        if scale.name not in done:
            old = numpy_helper.to_array(scale)
            scale.CopyFrom(numpy_helper.from_array((old * (INT8_MAX / FP8_MAX)).astype(old.dtype), scale.name))
        if zero.name not in done:
            zero.CopyFrom(numpy_helper.from_array(np.zeros(zero.dims, float8), zero.name))
        done |= {scale.name, zero.name}
    return model


def _rewrite(path: Path, rewrite) -> None:
    onnx = require("onnx")
    model = rewrite(onnx.load(str(path)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _in_spec_dtypes(feeds: list[dict[str, np.ndarray]], spec: ComponentSpec) -> list[dict[str, np.ndarray]]:
    """Captured feeds (fp32 floats) in the dtypes of `spec`'s inputs (fp16 for an fp16 export)."""
    dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
    return [{name: value.astype(dtypes[name], copy=False) for name, value in feed.items()} for feed in feeds]


def _scheme(precision: str) -> dict:
    """The manifest's account of the quantisation (vgrt.calibration.int8.write_quantised_manifest)."""
    if precision == "int8":
        tool, activations, weights = "", "int8 symmetric", "int8 symmetric, per output channel"
    else:
        tool = " + FP8 scales (vgrt.calibration.tensorrt_qdq.to_fp8)"
        activations, weights = "FLOAT8E4M3FN (scale amax / 448)", "FLOAT8E4M3FN per tensor, quantised by TensorRT"
    return {
        "precision": precision,
        "tool": f"onnxruntime.quantization.quantize_static (QDQ, TensorRT form){tool}",
        "backends": ["tensorrt"],
        "quantised_ops": list(QUANTISED_OPS),
        "activations": f"{activations}, per tensor, min/max calibration",
        "weights": weights,
        "kept_in_float": [*KEPT_IN_FLOAT, "biases (TensorRT has no INT32 dequantisation)", "all of these in fp16"],
    }
