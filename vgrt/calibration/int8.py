"""CPU INT8 UNet exports: ONNX Runtime static Q/DQ calibrated on a captured set, with float fallback.

Measured on the tiny preset (2 shared cores, feeds captured from VCF, error on held-out feeds; timings
interleaved in one run, this machine drifts by 20% or more; `vgrt calibrate` reports the same figures):

| quantiser (Conv, MatMul and Gemm; attention and normalisation stay float) | time / its fp32 | error |
|---|---|---|
| ONNX Runtime static Q/DQ (u8 asymmetric activations, s8 per-channel weights) | 0.70-0.92 | 0.03-0.05 |
| the same Q/DQ ONNX on OpenVINO (read as FakeQuantize)                        | 1.3-2.4   | 0.03-0.05 |
| NNCF 3.4 on the OpenVINO model, ModelType.TRANSFORMER (default type: 0.44)  | 0.6-1.0   | 0.15 |
| ONNX Runtime static Q/DQ with s8 symmetric activations                       | ONNX Runtime refuses the model at opset 23 | |

ONNX Runtime's Q/DQ is kept: a third of NNCF's error, faster than its own fp32, and one Q/DQ ONNX file
that both CPU backends open (NNCF writes OpenVINO IR, which only OpenVINO reads; NNCF's Q/DQ ONNX runs
wrongly on OpenVINO). On a model as small as tiny, OpenVINO gains nothing from INT8: SD 1.5 is to be
measured (`vgrt bench unet`), not assumed. The opset-23 `Attention`
ops and vgrt's masked-attention functions are not quantised by either tool, so softmax and masking stay
in float; restricting the quantised ops to Conv, MatMul and Gemm keeps GroupNorm/LayerNorm in float too.

Attention in int8 (`Int8Settings.int8_attention`, on by default): the attentions without a mask are then
rewritten with Q/DQ pairs on q, k, v and the softmax probabilities (vgrt.calibration.attention_qdq), which
OpenVINO runs as int8 attention kernels; masked attention stays in float. On SD 1.5 (LocRef, random weights,
b2 64x64, OpenVINO, 2 threads, interleaved with PyTorch fp32) the INT8 UNet went from 0.43 to 0.34 of
PyTorch's time, and its held-out error from 0.0996 to 0.0994.

Mixed precision: after a first quantisation, each quantised layer's signal-to-quantisation-noise ratio is
measured on held-out feeds (vgrt.calibration.sensitivity); layers below `sqnr_threshold_db` are smoothed
(SmoothQuant, vgrt.calibration.smoothquant) and quantised again, and those still below it are left in float
and the model is quantised once more without them. On SD 1.5 min/max INT8 left 20 layers in float (16
feed-forward output projections at 25-28 dB, 4 shortcut convolutions), 11% of OpenVINO's INT8 time;
smoothed, the 4 convolutions pass (30-32 dB on held-out feeds) and the 16 projections do not (26-29 dB),
so smoothing is an option (`Int8Settings.smoothquant_alphas`), off by default.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vgrt._lazy import require
from vgrt.calibration import DEFAULT_INT8_ATTENTION, DEFAULT_SQNR_THRESHOLD_DB
from vgrt.calibration.attention_qdq import AttentionRanges, measure_ranges, quantise_attention
from vgrt.calibration.dataset import CalibrationSet, read_set
from vgrt.calibration.sensitivity import QUANTISED_OPS, layer_sqnr_db
from vgrt.calibration.smoothquant import smoothed_model
from vgrt.errors import InvalidInputError
from vgrt.export.blobs import external_files, private_copy
from vgrt.export.manifest import read_manifest, write_manifest
from vgrt.export.staging import atomic_directory, claimed_target
from vgrt.export.verify import remember, stamp_file

log = logging.getLogger(__name__)

SMOOTHING_FEEDS = 8  # calibration feeds whose activation maxima set the smoothing scales (a float pass each)

BACKENDS = ("onnxruntime", "openvino")  # both read ONNX Runtime's Q/DQ ONNX
KEPT_IN_FLOAT = [
    "attention (opset-23 Attention and vgrt::MaskedAttention: softmax and masking)",
    "normalisation (GroupNorm, LayerNorm)",
    "elementwise ops",
]
KEPT_IN_FLOAT_WITH_INT8_ATTENTION = [
    "masked attention (vgrt::MaskedAttention: softmax and masking)",
    "softmax of the plain attentions (its probabilities are quantised after it)",
    *KEPT_IN_FLOAT[1:],
]
INT8_ATTENTION = "q, k, v int8 symmetric per tensor (max |value| / 127); softmax probabilities uint8 (max / 255)"


def cpu_int8_scheme(int8_attention: bool, reduce_range: bool) -> dict[str, Any]:
    """The manifest's account of the CPU INT8 quantisation (see `write_quantised_manifest`)."""
    tool, ops = "onnxruntime.quantization.quantize_static (QDQ)", list(QUANTISED_OPS)
    if int8_attention:
        tool, ops = f"{tool} + vgrt.calibration.attention_qdq", [*ops, "Attention (without a mask)"]
    return {
        "precision": "int8",
        "tool": tool,
        "backends": list(BACKENDS),
        "quantised_ops": ops,
        "activations": "uint8 asymmetric, per tensor, min/max calibration",
        "weights": f"int8 symmetric, per output channel{', 7-bit range (reduce_range)' if reduce_range else ''}",
        "reduce_range": reduce_range,
        "kept_in_float": KEPT_IN_FLOAT_WITH_INT8_ATTENTION if int8_attention else KEPT_IN_FLOAT,
    }


@dataclass(frozen=True)
class Int8Settings:
    """How `quantize_export` quantises.

    Args:
        sqnr_threshold_db: layers whose held-out SQNR is below it stay in float; None: no fallback.
        held_out: every n-th captured sample is held out of calibration, for the SQNR and the error.
        float_layers: node names kept in float whatever their SQNR.
        smoothquant_alphas: layers below the threshold are first smoothed (vgrt.calibration.smoothquant), each
            with the migration strength of these that suits it best, and quantised again; only those still
            below it stay in float. Empty: they go straight to float.
        int8_attention: the attentions without a mask run their two products in int8
            (vgrt.calibration.attention_qdq); masked attentions stay in float.
        reduce_range: weights in 7 bits (ONNX Runtime's reduce_range), for CPUs without int8 dot-product units
            (VNNI, AMX-INT8): their kernels add pairs of u8 x s8 products in saturating int16, which 8-bit
            weights overflow. None: chosen by this CPU (see `reduces_range`).
    """

    sqnr_threshold_db: float | None = DEFAULT_SQNR_THRESHOLD_DB
    held_out: int = 4
    float_layers: tuple[str, ...] = ()
    # Off by default: on SD 1.5 (random weights) it quantised 4 shortcut convolutions at 30-32 dB, about 1% of
    # OpenVINO's time, and the held-out UNet error rose from 0.100 to 0.132; the 16 projections stayed in
    # float. vgrt.calibration.smoothquant.ALPHAS turns it on (`vgrt calibrate --smoothquant 0.5,0.6,0.7,0.8`).
    smoothquant_alphas: tuple[float, ...] = ()
    int8_attention: bool = DEFAULT_INT8_ATTENTION
    reduce_range: bool | None = None

    def validate(self) -> None:
        if self.held_out < 2:
            raise InvalidInputError(f"held_out must be >= 2 (every n-th sample is held out), got {self.held_out}")
        if any(not 0 <= alpha <= 1 for alpha in self.smoothquant_alphas):
            raise InvalidInputError(
                f"smoothquant_alphas must lie in [0, 1] (the share of the activation's spread moved into the "
                f"weight), or be empty (no smoothing), got {self.smoothquant_alphas}"
            )


def reduces_range(settings: Int8Settings) -> bool:
    """Whether the weights are quantised in 7 bits: as `settings` says, else where this CPU has no int8
    dot-product units or does not say. On tiny (AVX2, no VNNI) 8-bit weights gave a held-out error of 0.19 on
    both CPU backends, 7-bit ones 0.05; with VNNI the 8-bit error was 0.03-0.05."""
    from vgrt.engines.cpu_features import read_cpu_features

    return settings.reduce_range if settings.reduce_range is not None else read_cpu_features().int8 is not True


@dataclass
class QuantisationReport:
    """What `quantize_export` measured: per-layer SQNR (dB), the layers kept in float, the held-out error."""

    layer_sqnr_db: dict[str, float] = field(default_factory=dict)
    float_layers: list[str] = field(default_factory=list)
    smoothed_layers: dict[str, float] = field(default_factory=dict)  # layer: its SmoothQuant alpha
    relative_error: float = 0.0  # ||int8 - fp32|| / ||fp32|| of the UNet output, worst held-out feed
    calibration_samples: int = 0
    held_out_samples: int = 0
    seconds: float = 0.0
    attention_ranges: dict[str, AttentionRanges] = field(default_factory=dict)  # the attentions in int8


def quantize_export(
    export_dir: str | Path,
    calibration: str | Path | CalibrationSet,
    out: str | Path,
    settings: Int8Settings = Int8Settings(),
    component: str = "unet",
    progress: bool = False,
) -> tuple[Path, QuantisationReport]:
    """Write an INT8 export of `component` of `export_dir` (an fp32 export) to `out`, calibrated on the
    captured feeds that fit its inputs; returns `out` and what was measured. `out` is replaced atomically
    when it is a vgrt export; anything else there is refused before any work. `progress`: a bar over the
    passes."""
    settings.validate()
    require("onnxruntime.quantization")
    manifest = read_manifest(export_dir)
    entry = manifest.component(component)
    if manifest.data["settings"]["dtype"] != "fp32" or manifest.data.get("precision", "fp32") != "fp32":
        raise InvalidInputError(
            f"{str(export_dir)!r} is a {manifest.data.get('precision', manifest.data['settings']['dtype'])} export; "
            "INT8 is calibrated from an fp32 export: export with --precision fp32"
        )
    calibration = calibration if isinstance(calibration, CalibrationSet) else read_set(calibration)
    calib, held = split_feeds(calibration, {t.name for t in entry.spec.inputs}, settings.held_out)
    reduce_range = reduces_range(settings)
    out = Path(out)
    with claimed_target(out), atomic_directory(out) as staging, private_copy(manifest.path(entry)) as source:
        target = staging / entry.file
        attention = settings.int8_attention
        planned = attention + fallback_passes(bool(settings.smoothquant_alphas), finish=attention)
        with closing(Passes(planned, progress)) as passes:
            ranges = {}
            if attention:
                with passes.run("attention ranges"):
                    ranges = measure_ranges(source, calib)
                if not ranges:
                    passes.skip(1)  # no attention without a mask: nothing to finish
            report = quantise_with_fallback(
                lambda model, float_layers: quantise_qdq(model, target, calib, float_layers, reduce_range),
                source, target, held, settings, calib=calib,
                finish=(lambda model: quantise_attention(model, ranges)) if ranges else None, passes=passes,
            )  # fmt: skip
        report.calibration_samples = len(calib)
        report.attention_ranges = ranges
        scheme = cpu_int8_scheme(settings.int8_attention, reduce_range)
        write_quantised_manifest(staging, manifest.data, component, entry.file, calibration, report, settings, scheme)
    return out, report


def split_feeds(
    calibration: CalibrationSet, input_names: set[str], held_out: int
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(calibration feeds, held-out feeds) of the runs whose feeds fit `input_names`: every `held_out`-th
    sample is held out."""
    runs = calibration.runs_for(input_names)
    if not runs:
        have = sorted({f"{r.method} ({r.features})" for r in calibration.runs.values()}) or ["nothing"]
        raise InvalidInputError(
            f"the calibration set {str(calibration.directory)!r} has no feeds for a UNet with inputs "
            f"{sorted(input_names)}; it holds {', '.join(have)}: capture a method that runs this UNet's features"
        )
    feeds = [{name: value.numpy() for name, value in feed.items()} for feed in calibration.samples(runs)]
    held = feeds[held_out - 1 :: held_out]
    calib = [feed for i, feed in enumerate(feeds) if i % held_out != held_out - 1]
    if not held or not calib:
        raise InvalidInputError(
            f"the calibration set has {len(feeds)} samples for this UNet; quantising needs at least {held_out} "
            "(some are held out to measure the error): capture more, e.g. --max-samples 16"
        )
    return calib, held


class Passes:
    """A progress bar over a quantisation's passes (minutes each on SD 1.5), the running one named; `ran`
    lists the passes run, `total` those planned."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.ran = total, []
        self.bar = tqdm(total=total, desc="quantise", unit="pass", disable=not enabled)

    @contextmanager
    def run(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        yield
        self.ran.append(name)
        self.bar.update()

    def skip(self, count: int) -> None:
        """`count` planned passes will not run (no layer below the threshold, or none left to smooth)."""
        self.total -= count
        self.bar.total = self.total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def fallback_passes(smoothing: bool, finish: bool) -> int:
    """The passes `quantise_with_fallback` plans: quantise, SQNR, [smooth, quantise, SQNR], quantise without
    the low layers, [finish], error."""
    return 4 + 3 * smoothing + finish


def quantise_with_fallback(
    quantise: Callable[[Path, list[str]], None],
    source: Path,
    target: Path,
    held: list[dict],
    settings: Int8Settings,
    exact: bool = False,
    calib: list[dict] | None = None,
    finish: Callable[[Path], Any] | None = None,
    passes: Passes | None = None,
) -> QuantisationReport:
    """`quantise(model, float_layers)` writes `target` from the float `model`: first from `source` with
    `settings.float_layers` in float; the layers whose held-out SQNR is below the threshold are then smoothed
    (see `settings.smoothquant_alphas`; activations of the first `calib` feeds) and quantised again, and those
    still below it are added to the float layers for a last quantisation. `finish(target)` then rewrites the
    final model (e.g. its attention in int8). The error is measured on held-out feeds against `source`
    (`exact`: unoptimised, see `_session`). `passes` shows the progress (see `fallback_passes`)."""
    started = time.perf_counter()
    smoothing = bool(settings.smoothquant_alphas and calib)
    passes = passes or Passes(fallback_passes(smoothing, finish is not None), enabled=False)
    kept = list(settings.float_layers)
    with passes.run("quantise"):
        quantise(source, kept)
    with passes.run("per-layer SQNR"):
        sqnr = layer_sqnr_db(source, target, held)
    with ExitStack() as stack:
        model, smoothed = source, {}
        low = _below(sqnr, settings.sqnr_threshold_db)
        if low and smoothing:
            with passes.run(f"SmoothQuant ({len(low)} below threshold)"):
                smoothing_pass = smoothed_model(source, low, list(calib[:SMOOTHING_FEEDS]), settings.smoothquant_alphas)
                model, smoothed = stack.enter_context(smoothing_pass)
            log.info("%d layers below %.1f dB SQNR smoothed: %s", len(smoothed), settings.sqnr_threshold_db, smoothed)
            with passes.run("quantise smoothed"):
                quantise(model, kept)
            with passes.run("per-layer SQNR"):
                sqnr = layer_sqnr_db(model, target, held, by_output=frozenset(smoothed))
            low = _below(sqnr, settings.sqnr_threshold_db)
        elif smoothing:
            passes.skip(3)
        if low:
            log.info(
                "%d layers below %.1f dB SQNR stay in float: %s", len(low), settings.sqnr_threshold_db, ", ".join(low)
            )
            kept += low
            with passes.run(f"quantise ({len(low)} in float)"):
                quantise(model, kept)
        else:
            passes.skip(1)
    if finish is not None:
        with passes.run("finish"):
            finish(target)
    with passes.run("held-out error"):
        error = relative_output_error(source, target, held, exact)
    kept = sorted(set(kept))
    smoothed = {name: alpha for name, alpha in sorted(smoothed.items()) if name not in kept}
    return QuantisationReport(sqnr, kept, smoothed, error, 0, len(held), time.perf_counter() - started)


def _below(sqnr: dict[str, float], threshold_db: float | None) -> list[str]:
    return sorted(name for name, db in sqnr.items() if threshold_db is not None and db < threshold_db)


def quantise_qdq(
    source: Path, target: Path, feeds: list[dict[str, np.ndarray]], float_layers: list[str], reduce_range: bool
) -> None:
    """ONNX Runtime static Q/DQ of Conv, MatMul and Gemm: u8 asymmetric activations (min/max over `feeds`),
    s8 symmetric per-channel weights (7-bit with `reduce_range`); `float_layers` (node names) left in float."""
    quantization = require("onnxruntime.quantization")
    with preprocessing_advice_dropped():
        quantization.quantize_static(
            str(source), str(target), feed_reader(feeds), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=list(float_layers),
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            reduce_range=reduce_range, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            use_external_data_format=bool(external_files(source)),  # above protobuf's 2 GB (SD UNets in fp32)
        )  # fmt: skip


def feed_reader(feeds: list[dict[str, np.ndarray]]):
    """An ONNX Runtime CalibrationDataReader over `feeds`."""
    quantization = require("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    return Reader()


@contextmanager
def preprocessing_advice_dropped() -> Iterator[None]:
    """quantize_static logs (on the root logger) advice to run its pre-processing, which fails on opset-23
    Attention ops (its shape inference takes them for the contrib op): drop that line only."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def relative_output_error(
    reference: Path, quantised: Path, feeds: list[dict[str, np.ndarray]], exact: bool = False
) -> float:
    """The worst ||quantised - reference|| / ||reference|| of the first output over `feeds` (`exact`: the
    graphs run unoptimised)."""
    ref, quant = _session(reference, exact), _session(quantised, exact)
    worst = 0.0
    for feed in feeds:
        expected, got = ref.run(None, feed)[0], quant.run(None, feed)[0]
        worst = max(worst, float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)))
    return worst


def _session(path: Path, exact: bool = False):
    """An ONNX Runtime CPU session; `exact`: with no graph optimisation, so that it computes what the ONNX
    operators define. Optimised, ONNX Runtime 1.32 refuses symmetric INT8 Q/DQ at opset 23 (its Q/DQ
    propagation gives signed pairs unsigned zero points) and folds FP8 weight Q/DQ pairs wrongly (0.44
    error on tiny against 0.13)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_quantised_manifest(
    staging: Path,
    source: dict[str, Any],
    component: str,
    file: str,
    calibration: CalibrationSet,
    report: QuantisationReport,
    settings: Int8Settings,
    scheme: dict[str, Any],
) -> None:
    """The manifest of a quantised export of `component`: the source export's, with the quantised file, the
    precision and `scheme` (tool, precision, backends and what stays in float), and what was measured."""
    stamps = {name: stamp_file(staging / name) for name in [file, *external_files(staging / file)]}
    entry = dict(source["components"][component])
    files = {name: {"bytes": stamp.bytes, "sha256": stamp.sha256} for name, stamp in stamps.items()}
    entry.update(file=file, onnx_sha256=stamps[file].sha256, files=files)
    remember(staging, stamps)
    data = {key: value for key, value in source.items() if key != "format_version"}
    data["components"] = {component: entry}
    data["precision"] = scheme["precision"]
    data["quantization"] = {
        **{key: value for key, value in scheme.items() if key != "precision"},
        "float_layers": report.float_layers,
        "smoothquant": {"alphas": list(settings.smoothquant_alphas), "layers": report.smoothed_layers},
        "int8_attention": _attention_entry(report) if settings.int8_attention else None,
        "sqnr_threshold_db": settings.sqnr_threshold_db,
        "layer_sqnr_db": {name: round(db, 2) for name, db in sorted(report.layer_sqnr_db.items())},
        "held_out_relative_error": report.relative_error,
        "calibration": {
            **calibration.describe(),
            "calibration_samples": report.calibration_samples,
            "held_out_samples": report.held_out_samples,
        },
    }
    write_manifest(staging, data)


def _attention_entry(report: QuantisationReport) -> dict[str, Any]:
    """The manifest's record of the attentions in int8: their form and each one's calibrated ranges."""
    ranges = {
        name: {k: round(v, 6) for k, v in asdict(r).items()} for name, r in sorted(report.attention_ranges.items())
    }
    return {"form": INT8_ATTENTION, "ranges": ranges}
