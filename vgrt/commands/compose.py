"""Compose an image from visual prompts with one of the methods (engines exported on first use)."""

import argparse
from dataclasses import replace

from vgrt.engines import BACKENDS
from vgrt.precision import PRECISIONS
from vgrt.runtime.methods.registry import METHODS, Method

ATTENTION_ROUTES = ("plugin", "native")  # vgrt.engines.engine_set.ATTENTION_ROUTES, without importing torch here
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", required=True)
    for method in METHODS.values():
        sub = methods.add_parser(method.name, help=method.summary, description=method.description or None)
        _add_method_options(sub, method)
        _add_engine_options(sub)


def _add_method_options(parser: argparse.ArgumentParser, method: Method) -> None:
    """The method's request inputs (vgrt.runtime.methods.registry) as options; alternatives in a group
    that takes exactly one."""
    groups = {}
    for option in method.options:
        target = parser
        if option.one_of:
            if option.one_of not in groups:
                groups[option.one_of] = parser.add_mutually_exclusive_group(required=True)
            target = groups[option.one_of]
        settings = {"help": option.help, "type": option.type, "default": option.default}
        if option.choices:
            settings["choices"] = option.choices
        if option.repeated:
            settings["action"] = "append"
        if option.required:
            settings["required"] = True
        target.add_argument(option.flag, **settings)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output image (.png or .jpg); written only on success")
    parser.add_argument(
        "--backend", choices=BACKENDS,
        help="default: openvino where installed, else onnxruntime (the fastest CPU engines that meet fp32 parity)",
    )  # fmt: skip
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda for tensorrt, else cpu); cuda needs an NVIDIA GPU"
    )
    parser.add_argument(
        "--attention", choices=ATTENTION_ROUTES,
        help="tensorrt only: vgrt's masked-attention plugin, which skips masked key tiles, or TensorRT's own "
        "attention (default: plugin)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help="the engines' arithmetic (default: fp16 on tensorrt, else fp32); bf16 runs on openvino on CPUs with "
        "BF16 units (vgrt.precision says which backend runs which)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrated", action="append", metavar="DIR",
        help="with --precision int8 (fp8: tensorrt): a UNet export quantised by `vgrt calibrate` (its --out), run "
        "in place of the UNet of its features; repeatable; the rest runs in fp32 (fp16 on tensorrt)",
    )  # fmt: skip
    parser.add_argument(
        "--preset", help="tiny, sd15, sd21 or sdxl (default: the --weights folder's own, else tiny, random weights)"
    )
    parser.add_argument(
        "--weights", help="local diffusers folder as published (model_index.json, unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/); its preset is read from its configs",
    )  # fmt: skip
    add_checkpoint_options(parser)
    parser.add_argument("--cache", help="export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt)")


def add_checkpoint_options(parser) -> None:
    """--adapter and --allow-pickle, as compose, export and serve take them (a parser or an argument group)."""
    parser.add_argument(
        "--adapter", action="append", metavar="PATH",
        help="adapter checkpoint as its authors publish it, or a folder of them; repeatable: IP-Adapter "
        "(ip-adapter_sd15.safetensors, ip-adapter_sdxl.safetensors, with the image_encoder/ folder beside it), "
        "AIComposer's mlp_sdxl.pth, VCF's aligner, or vgrt's adapter layout (README: adapter checkpoints)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="also read pickled checkpoints (.bin, .pth), which can run code when loaded",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vgrt.checks import check_output_file, check_seed, check_writable_folder
    from vgrt.engines import default_backend
    from vgrt.export.cache import cache_root
    from vgrt.models.adapter_checkpoints import check_source_adapters
    from vgrt.models.source import ModelSource
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.images import save_image

    # Everything a user can get wrong is refused here, before any image is decoded or engine exported.
    out = check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    args.backend = args.backend or default_backend()
    check_writable_folder(args.cache or cache_root(), "--cache" if args.cache else "the cache (--cache or $VGRT_CACHE)")
    check_seed(args.seed, "--seed")
    options = composer_options(args.backend, args.device, args.attention, args.precision, args.calibrated)
    source = ModelSource.from_options(args.preset, args.weights)  # --seed is the sampling seed, not the weights'
    source = replace(source, allow_pickle=args.allow_pickle, adapters=tuple(args.adapter or ()))
    check_source_adapters(source, source.model_preset())
    method = METHODS[args.method]
    request = method.request(
        {option.name: getattr(args, option.name) for option in method.options}, source.model_preset()
    )
    with Composer(source, args.backend, cache=args.cache, **options) as composer:
        result = method.compose(composer, request)
        record = provenance(args, request, composer)
    save_image(result.image, out, record)
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.times.seconds.items())
    print(f"wrote {out} ({stages})")
    if args.weights is None:
        print("note: preset weights are random, so the image is noise-like; use --weights for real images")
    return 0


def composer_options(
    backend: str, device: str | None, attention: str | None, precision: str | None, calibrated: list[str] | None = None
) -> dict:
    """The Composer's keyword settings for --backend, --device, --attention and --precision, refused where
    the backend cannot take them, where this machine lacks the device (or the tensorrt backend lacks
    TensorRT), or bf16 on a CPU without BF16 units: all before any export."""
    from vgrt.engines.engine_set import check_backend_device, check_calibrated, parse_device
    from vgrt.errors import InvalidInputError
    from vgrt.precision import QUANTISED, default_precision, precision_settings

    if attention is not None and backend != "tensorrt":
        raise InvalidInputError(
            f"--attention {attention} is a tensorrt option, and the backend is {backend}; "
            "add --backend tensorrt, or leave --attention out"
        )
    precision = precision or default_precision(backend)
    settings = precision_settings(precision, backend, calibrated or ())
    check_calibrated(settings["calibrated"], backend)
    device = device or ("cuda" if backend == "tensorrt" else "cpu")
    check_backend_device(backend, parse_device(device))
    runner_options = {}
    if backend == "openvino" and precision not in QUANTISED:  # a quantised UNet runs OpenVINO's default
        from vgrt._lazy import require
        from vgrt.engines.openvino_runner import check_precision as check_cpu_supports

        check_cpu_supports(require("openvino").Core(), precision)
        runner_options["precision"] = precision
    return {
        "device": device,
        "attention": attention or ATTENTION_ROUTES[0],
        "runner_options": runner_options,
        **settings,
    }


def provenance(args: argparse.Namespace, request, composer) -> dict[str, str]:
    """How the image was made, stored in its PNG text chunks (`Image.open(path).text`)."""
    from pathlib import Path

    from vgrt import __version__

    source = composer.source
    record = {
        "Software": f"vgrt {__version__}",
        "vgrt.version": __version__,
        "vgrt.method": args.method,
        "vgrt.steps": str(request.steps),
        "vgrt.guidance_scale": str(request.guidance_scale),
        "vgrt.backend": composer.backend,
        "vgrt.device": str(composer.device),
        "vgrt.precision": args.precision or composer.runner_options.get("precision", composer.dtype),
        "vgrt.preset": source.preset,
        "vgrt.weights": str(Path(source.weights).resolve()) if source.weights else f"random, seed {source.seed}",
    }
    if source.adapters:
        record["vgrt.adapters"] = ", ".join(str(Path(adapter).resolve()) for adapter in source.adapters)
    if composer.backend == "tensorrt":
        record["vgrt.attention"] = composer.attention
    if hasattr(request, "seed"):  # AIComposer starts from an inversion, not from seeded noise
        record["vgrt.seed"] = str(request.seed)
    return record
