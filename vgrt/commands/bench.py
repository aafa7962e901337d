"""Time the UNet, the masked-attention op, the export or whole compositions; write JSON and PNG, print a table."""

import argparse

DEFAULT_OUT = "bench/results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vgrt.bench.suites import describe_suites

    parser.add_argument("suite", help=f"what to time: {describe_suites()}")
    parser.add_argument(
        "--preset", help="comma-separated presets (default: sd15, sd15,sdxl for attention; tiny with --quick)"
    )
    parser.add_argument(
        "--backends",
        help="comma-separated backends (default: every one available here); torch, the baseline, is always timed",
    )
    parser.add_argument("--batch", help="comma-separated batch sizes (default: the preset's profile opt)")
    parser.add_argument(
        "--latent",
        help="comma-separated latent sizes, square (default: the preset's profile opt); compose: images of "
        "latent x the VAE factor pixels (sd15: 64 -> 512x512)",
    )
    parser.add_argument(
        "--features",
        action="append",
        help="feature set, as for `vgrt export --features`; repeat for several (default: none)",
    )
    parser.add_argument(
        "--precision", help="comma-separated export precisions: fp32, fp16 (default: fp32); bf16 engines are "
        "competitors of their own (torch-bf16, openvino-bf16)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, help="untimed calls per competitor first (default: 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per competitor (default: 5, 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads of every backend (default: PyTorch's default)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: tiny preset, fewer sizes, repeats and steps"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and PNG (default: {DEFAULT_OUT})")
    parser.add_argument("--export-dir", help="unet suite: time this existing export instead of exporting first")
    parser.add_argument(
        "--quantised", metavar="DIR",
        help="unet suite: an INT8 export of the same model (the --out of vgrt calibrate), timed as the competitors "
        "onnxruntime-int8 and openvino-int8",
    )  # fmt: skip
    parser.add_argument(
        "--feeds",
        metavar="SET",
        help="unet suite: time the conditioned UNet against the plain one on the UNet feeds of real method runs, a "
        "calibration set (`vgrt calibrate METHOD --capture-only --set SET`): one feed per distinct shape and gate "
        "phase, conditioned / plain per phase and weighted by calls; the conditioned export is --export-dir, or the "
        "cache's for the set's model and each run's feature set",
    )
    parser.add_argument(
        "--plain-export-dir", metavar="DIR",
        help="unet suite with --feeds: the plain UNet (features none) to time against (default: the cache's)",
    )  # fmt: skip
    parser.add_argument("--methods", help="compose suite: comma-separated methods (default: every one it knows)")
    parser.add_argument(
        "--steps",
        type=int,
        help="compose and peer suites: schedule length of each composition (compose: 20, peer: 10; 3 and 2 with --quick)",
    )
    parser.add_argument(
        "--gradient-steps",
        type=int,
        help="compose suite: PNO iterations (vcf-pno) and guidance steps (visual-prompts, at most --steps) "
        "(default: each method's own, 10 and 5)",
    )
    parser.add_argument(
        "--calibrated", action="append", metavar="DIR",
        help="compose suite: an INT8 UNet of `vgrt calibrate METHOD ... --out DIR`, run by the competitors "
        "onnxruntime-int8 and openvino-int8 for the methods it was calibrated on; repeatable, one per method",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vgrt.bench.report import markdown_table, write_run
    from vgrt.bench.run import run_bench
    from vgrt.bench.settings import make_settings

    settings = make_settings(
        args.suite,
        backends=_names(args.backends),
        presets=_names(args.preset),
        batches=_sizes(args.batch, "--batch"),
        latents=_sizes(args.latent, "--latent"),
        features=None if args.features is None else tuple(args.features),
        dtypes=_names(args.precision),
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        quick=args.quick,
        export_dir=args.export_dir,
        quantised_dir=args.quantised,
        methods=_names(args.methods),
        steps=args.steps,
        gradient_steps=args.gradient_steps,
        feeds_dir=args.feeds,
        plain_export_dir=args.plain_export_dir,
        calibrated=None if args.calibrated is None else tuple(args.calibrated),
    )
    result = run_bench(settings)
    json_path, png_path = write_run(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(name.strip() for name in text.split(",") if name.strip())


def _sizes(text: str | None, flag: str) -> tuple[int, ...] | None:
    from vgrt.errors import InvalidInputError

    names = _names(text)
    if names is None:
        return None
    try:
        return tuple(int(n) for n in names)
    except ValueError:
        raise InvalidInputError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
