"""Build inference engines for an exported directory (TensorRT: cached, rebuilt when stale or corrupt)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vgrt.engines.tensorrt.settings import ATTENTION_ROUTES

    parser.add_argument("directory", help="an exported directory (from `vgrt export`)")
    parser.add_argument("--backend", default="tensorrt", choices=("tensorrt",), help="engine kind (default: tensorrt)")
    parser.add_argument("--component", default="unet")
    parser.add_argument(
        "--attention", default="plugin", choices=ATTENTION_ROUTES,
        help="masked attention as vgrt's plugin (default; needs an export with --attention custom) or as "
        "TensorRT's native attention (ONNX Attention op, needs opset 23)",
    )  # fmt: skip
    parser.add_argument(
        "--jit", action="store_true",
        help="run the plugin's Python implementation instead of baking its PTX in (the engine then needs vgrt to run)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "int8", "fp8"),
        help="the engine's precision, which TensorRT takes from the export (strongly typed): fp16 from an fp16 export, "
        "int8 or fp8 from the Q/DQ export of `vgrt calibrate --target tensorrt`; given, the export is checked for it",
    )  # fmt: skip
    parser.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    parser.add_argument("--cache-dir", help="where engines and the timing cache go (default: DIRECTORY/tensorrt)")


def run(args: argparse.Namespace) -> int:
    from vgrt.engines.tensorrt.build import build_engine
    from vgrt.engines.tensorrt.settings import BuildSettings

    settings = BuildSettings(
        component=args.component, attention=args.attention, aot=not args.jit, optimization_level=args.optimization_level
    )
    print(f"engine: {build_engine(args.directory, settings, cache_dir=args.cache_dir, precision=args.precision)}")
    return 0
