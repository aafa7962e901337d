"""Calibrate an INT8 (or FP8) UNet on a method's own UNet inputs: capture them, quantise, report the quality.

    vgrt calibrate METHOD [that method's compose inputs] --preset P|--weights DIR --out DIR
        [--target cpu|tensorrt] [--precision int8|fp8]

--target cpu (default) writes the INT8 UNet that onnxruntime and openvino run (`vgrt compose --precision
int8 --calibrated OUT`); --target tensorrt writes Q/DQ ONNX in TensorRT's form, INT8 or FP8, which
`vgrt build OUT --precision P` turns into an engine on a GPU. --int8-attention (cpu) quantises the
attentions without a mask too, so that OpenVINO runs their two products in int8.

Without compose arguments the method runs on the example inputs of `vgrt examples`. The captured feeds
go to a calibration set (--set, default OUT-calibration), which a re-run resumes; --capture-only stops
after capturing (run it for several methods into one set), --from-set quantises an existing set.

A run may call UNets of several feature sets (MCA-Ctrl inverts, and AIComposer steps outside its token
window, with the plain UNet): the set keeps each one's calls, --max-samples of each. One run of the
command quantises one of them, --features (default: the method's own); it then prints the commands that
quantise the others, and `vgrt compose --calibrated` takes one export per feature set.
"""

import argparse

TARGETS = ("cpu", "tensorrt")
PRECISIONS = ("int8", "fp8")
NOT_INPUTS = {"steps", "guidance", "seed", "size"}  # request settings every method takes: alone they are no inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vgrt.runtime.methods.registry import METHODS

    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method in METHODS.values():
        sub = methods.add_parser(method.name, help=method.summary, description=f"{method.summary}. {__doc__}")
        inputs = sub.add_argument_group(
            "the method's inputs, as `vgrt compose` takes them (none given: the example inputs)"
        )
        for option in method.options:  # all optional here: absent, the examples stand in
            settings = {"help": option.help, "type": option.type, "default": None}
            if option.choices:
                settings["choices"] = option.choices
            if option.repeated:
                settings["action"] = "append"
            inputs.add_argument(option.flag, **settings)
        _add_options(sub)


def _add_options(parser: argparse.ArgumentParser) -> None:
    from vgrt.calibration import (
        DEFAULT_FP8_SQNR_THRESHOLD_DB,
        DEFAULT_INT8_ATTENTION,
        DEFAULT_MAX_SAMPLES,
        DEFAULT_SQNR_THRESHOLD_DB,
    )

    parser.add_argument("--out", help="the INT8 export directory to write (replaced atomically when it is one)")
    parser.add_argument(
        "--preset", help="tiny, sd15, sd21 or sdxl (default: the --weights folder's own, else tiny, random weights)"
    )
    parser.add_argument("--weights", help="local diffusers folder with real weights")
    parser.add_argument("--target", default="cpu", choices=TARGETS, help="default: cpu")
    parser.add_argument("--precision", default="int8", choices=PRECISIONS, help="default: int8")
    parser.add_argument("--set", help="calibration set folder (default: OUT-calibration); a re-run resumes it")
    parser.add_argument("--capture-only", action="store_true", help="capture into --set, do not quantise")
    parser.add_argument("--from-set", action="store_true", help="quantise from --set as it is, capture nothing")
    parser.add_argument(
        "--seeds", default="0,1", help="sampling seeds, one run each; they replace --seed (default: 0,1)"
    )
    parser.add_argument("--example-size", type=int, help="side of the example images (default: the preset's native)")
    parser.add_argument(
        "--calls", default="all",
        help="UNet calls of each run to keep, counted over all its calls in the order they ran: all, every:K or 0,5,9",
    )  # fmt: skip
    parser.add_argument(
        "--max-samples",
        type=int,
        default=DEFAULT_MAX_SAMPLES,
        help=f"samples in the set of each UNet feature set the runs call (default: {DEFAULT_MAX_SAMPLES})",
    )
    parser.add_argument(
        "--features",
        help="the UNet to quantise, by its feature set as `vgrt export --features` names it, e.g. none for the "
        "plain UNet of MCA-Ctrl's inversions (default: the method's own)",
    )
    parser.add_argument(
        "--sqnr-threshold", type=float,
        help=f"layers below this SQNR (dB) stay in float (default: {DEFAULT_SQNR_THRESHOLD_DB:g} for int8, "
        f"{DEFAULT_FP8_SQNR_THRESHOLD_DB:g} for fp8, whose rounding alone costs about 29 dB); 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--smoothquant", default="none",
        help="SmoothQuant strengths tried on the layers below --sqnr-threshold before they stay in float, each "
        "layer taking its best, e.g. 0.5,0.6,0.7,0.8 (cpu int8; default: none, they stay in float at once)",
    )  # fmt: skip
    parser.add_argument(
        "--int8-attention", action=argparse.BooleanOptionalAction,
        help="run the attentions without a mask in int8 (q, k, v and softmax probabilities quantised; masked "
        f"attention stays float; cpu int8; default: {'on' if DEFAULT_INT8_ATTENTION else 'off'})",
    )  # fmt: skip
    parser.add_argument(
        "--reduce-range", action=argparse.BooleanOptionalAction,
        help="quantise the weights in 7 bits, which CPUs without VNNI or AMX-INT8 need (their int8 kernels "
        "saturate on 8-bit weights; cpu int8; default: by this CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--no-report", action="store_true", help="skip the quality report (each run again with fp32, int8 and bf16)"
    )
    parser.add_argument("--cache", help="export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vgrt.calibration.capture import capture
    from vgrt.calibration.dataset import read_set
    from vgrt.models.source import ModelSource

    out, calibration_set, calls = _checked(args)
    source = ModelSource(args.preset, weights=args.weights)
    runs = []
    if args.from_set:
        calibration = read_set(calibration_set)
    else:
        runs = _planned_runs(args, source.model_preset())
        calibration = capture(calibration_set, source, runs, calls, args.max_samples, cache=args.cache)
        print(f"captured {len(calibration)} samples in {calibration_set}")
        if args.capture_only:
            return 0
    _check_holds(calibration, args.method, args.features)
    _quantise(args, source, args.features, calibration, Path(out))
    if runs and not args.no_report and args.target == "cpu":
        _report(runs, source, Path(out), args.cache)
    elif args.target == "tensorrt":
        print(f"build its engine on a GPU: vgrt build {out} --precision {args.precision}")
    _print_other_layouts(args, calibration_set, calibration)
    return 0


def _checked(args: argparse.Namespace):
    """Everything a user can get wrong, refused before any model is built or run."""
    from pathlib import Path

    from vgrt.calibration import DEFAULT_INT8_ATTENTION
    from vgrt.calibration.capture import CallSelection
    from vgrt.checks import check_writable_folder
    from vgrt.errors import InvalidInputError
    from vgrt.export.staging import check_replaceable
    from vgrt.models.features import canonical_features
    from vgrt.models.source import ModelSource
    from vgrt.runtime.methods.registry import METHODS

    if args.precision == "fp8" and args.target != "tensorrt":
        raise InvalidInputError(
            "--precision fp8 is TensorRT's (Hopper and Ada GPUs); add --target tensorrt, or calibrate int8 for the CPU"
        )
    if args.int8_attention is not None and args.target != "cpu":
        raise InvalidInputError(
            "--int8-attention is for --target cpu (OpenVINO and ONNX Runtime); TensorRT's attention stays fp16"
        )
    if args.reduce_range is not None and args.target != "cpu":
        raise InvalidInputError("--reduce-range is for --target cpu; TensorRT's int8 kernels take 8-bit weights")
    if args.int8_attention is None:
        args.int8_attention = DEFAULT_INT8_ATTENTION
    if args.from_set and args.capture_only:
        raise InvalidInputError(
            "--from-set and --capture-only exclude each other: the one quantises, the other does not"
        )
    if args.out is None and not args.capture_only:
        raise InvalidInputError(
            "give --out DIR, the INT8 export to write (or --capture-only --set DIR to only capture)"
        )
    if args.set is None and args.out is None:
        raise InvalidInputError("--capture-only needs --set DIR, the calibration set to capture into")
    args.smoothquant = _alphas(args.smoothquant)
    args.features = canonical_features(args.features or METHODS[args.method].features)
    if args.max_samples < 1:
        raise InvalidInputError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.steps is not None and args.steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {args.steps}")
    args.preset = ModelSource.from_options(args.preset, args.weights).preset  # a --weights folder names its own
    if args.weights and not Path(args.weights).is_dir():
        raise InvalidInputError(f"--weights {args.weights!r} is not a folder; give a local diffusers model folder")
    calibration_set = Path(args.set or f"{args.out.rstrip('/')}-calibration")
    check_writable_folder(calibration_set, "--set")
    if args.out is not None and not args.capture_only:
        check_writable_folder(Path(args.out).parent, "--out")
        check_replaceable(Path(args.out))
    if args.cache:
        check_writable_folder(args.cache, "--cache")
    return args.out, calibration_set, CallSelection.parse(args.calls)


def _alphas(text: str) -> tuple[float, ...]:
    from vgrt.errors import InvalidInputError

    if text == "none":
        return ()
    try:
        alphas = tuple(float(part) for part in text.split(","))
    except ValueError:
        alphas = ()
    if not alphas or any(not 0 <= alpha <= 1 for alpha in alphas):
        raise InvalidInputError(
            f"--smoothquant {text!r} is not comma-separated numbers in [0, 1] (e.g. 0.5,0.8) or none"
        )
    return alphas


def _seeds(text: str) -> list[int]:
    from vgrt.errors import InvalidInputError

    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--seeds {text!r} is not comma-separated whole numbers, e.g. 0,1") from None


def _planned_runs(args: argparse.Namespace, model):
    """The runs to capture: the method on the inputs given, or on the example inputs when none are."""
    from vgrt.calibration import DEFAULT_STEPS
    from vgrt.calibration.capture import example_runs, plan_runs
    from vgrt.runtime.methods.registry import METHODS

    method, seeds = METHODS[args.method], _seeds(args.seeds)
    steps = args.steps or DEFAULT_STEPS
    given = {o.name: getattr(args, o.name) for o in method.options if getattr(args, o.name) is not None}
    if not set(given) - NOT_INPUTS:
        return example_runs(method.name, model, args.example_size, steps, seeds)
    request = method.request({**given, "steps": steps}, model)
    return plan_runs(method.name, method, request, seeds)


def _check_holds(calibration, method: str, features: str) -> None:
    """Refuse a set without calls of `method`'s UNet with `features`, naming what it holds and the fix."""
    from vgrt.errors import InvalidInputError

    layouts = calibration.layouts(method)
    if features in layouts:
        return
    held = sorted({f"{r.method} (features {r.features})" for r in calibration.runs.values()}) or ["nothing"]
    capture = f"vgrt calibrate {method} --capture-only --set NEW_SET"
    if not layouts:
        fix = f"capture {method}'s runs first: `{capture}`"
    elif all(run.run is None for run in calibration.runs.values() if run.method == method):
        fix = (
            "a set captured before vgrt kept every UNet a run calls holds each method's own only: capture again "
            f"into a new set, `{capture}`, then quantise it with --from-set --set NEW_SET --features {features}"
        )
    else:
        fix = f"{method}'s runs call no other UNet: choose --features {' or '.join(layouts)}"
    raise InvalidInputError(
        f"the calibration set {str(calibration.directory)!r} holds no calls of {method}'s UNet with features "
        f"{features}; it holds: {', '.join(held)}; {fix}"
    )


def _print_other_layouts(args: argparse.Namespace, calibration_set, calibration) -> None:
    """After the method's own UNet: the commands that quantise its other UNets in the set, and the compose
    that runs them all; after another: the compose that runs it with the own one."""
    from vgrt.models.features import canonical_features
    from vgrt.runtime.methods.registry import METHODS

    own = canonical_features(METHODS[args.method].features)
    others = [features for features in calibration.layouts(args.method) if features != args.features]
    if not others:
        return
    model = f"--weights {args.weights}" if args.weights else f"--preset {args.preset}"
    compose = f"vgrt compose {args.method} ... {model} --precision int8"
    if args.features != own:
        if args.target == "cpu":
            print(
                f"run it with the export of {args.method}'s own UNet: {compose} --calibrated OWN --calibrated {args.out}"
            )
        return
    target = f" --target {args.target} --precision {args.precision}" if args.target != "cpu" else ""
    outs = {features: f"{args.out.rstrip('/')}-{features.replace(',', '+')}" for features in others}
    print(f"the set also holds calls of {args.method}'s UNet with features {', '.join(others)}; quantise them with:")
    for features, out in outs.items():
        print(
            f"  vgrt calibrate {args.method} {model}{target} --from-set --set {calibration_set} --features {features} "
            f"--out {out}"
        )
    if args.target == "cpu":
        print(f"then run them all: {compose} " + " ".join(f"--calibrated {o}" for o in (args.out, *outs.values())))


def _quantise(args: argparse.Namespace, source, features: str, calibration, out) -> None:
    from vgrt.calibration.int8 import Int8Settings, quantize_export, reduces_range
    from vgrt.calibration.tensorrt_qdq import TensorRtQdqSettings, default_sqnr_threshold_db, quantize_for_tensorrt
    from vgrt.export.cache import cached_export
    from vgrt.export.exporter import ExportSettings

    tensorrt = args.target == "tensorrt"
    settings = ExportSettings(
        preset=args.preset,
        components="unet",
        features=features,
        weights=args.weights,
        dtype="fp16" if tensorrt else "fp32",
    )  # TensorRT's engine runs everything not quantised in the export's precision
    export = cached_export(settings, args.cache)
    threshold = default_sqnr_threshold_db(args.precision) if args.sqnr_threshold is None else args.sqnr_threshold
    threshold = threshold if threshold > 0 else None
    if tensorrt:
        settings = TensorRtQdqSettings(precision=args.precision, sqnr_threshold_db=threshold)
        out, report = quantize_for_tensorrt(export, calibration, out, settings, progress=True)
        runs_on = "Q/DQ for TensorRT, measured on ONNX Runtime's CPU reference"
    else:
        int8 = Int8Settings(
            threshold,
            smoothquant_alphas=args.smoothquant,
            int8_attention=args.int8_attention,
            reduce_range=args.reduce_range,
        )
        out, report = quantize_export(export, calibration, out, int8, progress=True)
        runs_on = "opens on onnxruntime and openvino" + ("; 7-bit weights" if reduces_range(int8) else "")
    worst = min(report.layer_sqnr_db.items(), key=lambda item: item[1])
    print(f"wrote {out}/manifest.json ({args.precision} UNet, features {features}; {runs_on})")
    print(
        f"  calibrated on {report.calibration_samples} samples, {report.held_out_samples} held out; "
        f"{len(report.layer_sqnr_db)} layers quantised, lowest SQNR {worst[1]:.1f} dB ({worst[0]})"
    )
    shown = ", ".join(report.float_layers[:6]) + (", ..." if len(report.float_layers) > 6 else "")
    below = f"below {threshold:g} dB" if threshold is not None else "no threshold"
    print(f"  {len(report.float_layers)} kept in float ({below}): {shown or 'none'}")
    if report.smoothed_layers:
        alphas = sorted(set(report.smoothed_layers.values()))
        print(f"  {len(report.smoothed_layers)} smoothed (SmoothQuant, alpha {', '.join(map(str, alphas))}) instead")
    if report.attention_ranges:
        print(f"  {len(report.attention_ranges)} attentions without a mask in int8 (masked attention stays float)")
    print(
        f"  UNet output relative error vs {'fp16' if tensorrt else 'fp32'} on held-out feeds: {report.relative_error:.4f}"
    )


def _report(runs, source, out, cache) -> None:
    """The final latents and images of each captured run with the INT8 UNet, against fp32 and the floor."""
    from vgrt.calibration.quality import quality_report

    print("quality against fp32 (final latents' relative error, decoded image PSNR):")
    for q in quality_report(runs, source, out, cache):
        print(
            f"  {q.method} seed {q.seed}: int8 {q.int8_latents_error:.4f}, {q.int8_psnr_db:.1f} dB; "
            f"{q.floor} {q.floor_latents_error:.4f}, {q.floor_psnr_db:.1f} dB"
        )
