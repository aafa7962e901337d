"""Export a preset's conditioned UNet to an ONNX directory with a manifest."""

import argparse

from vgrt.commands.compose import add_checkpoint_options
from vgrt.precision import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vgrt.models.features import FEATURES

    parser.add_argument("--preset", help="tiny, sd15, sd21 or sdxl (default: the --weights folder's own, else tiny)")
    parser.add_argument(
        "--components", default="unet", help="comma-separated components or 'all' (unet, vae_encoder, vae_decoder, "
        "text_encoder, text_encoder_2 for sdxl, image_encoder); default: unet",
    )  # fmt: skip
    parser.add_argument(
        "--features", default="none", help=f"comma-separated features, 'all' or 'none'; known: {', '.join(FEATURES)}"
    )
    parser.add_argument(
        "--out", required=True, help="output directory; an earlier vgrt export there is replaced atomically, "
        "anything else is refused",
    )  # fmt: skip
    parser.add_argument("--opset", type=int, default=23, help="ONNX opset, >= 18 (default: 23)")
    parser.add_argument(
        "--precision", default="fp32", choices=PRECISIONS,
        help="the engines' arithmetic this export is for: fp32 (default), fp16 (an fp16 graph), bf16 (the fp32 graph, "
        "which openvino runs in bf16); int8 and fp8 come from `vgrt calibrate`",
    )  # fmt: skip
    parser.add_argument(
        "--attention", default="custom", dest="attention_form", choices=("custom", "attention", "decomposed"),
        help="form of masked attention: vgrt::MaskedAttention node (default), ONNX Attention op, or MatMul/Softmax",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--weights", help="local diffusers folder as published (its preset is read from its configs), or a "
        ".safetensors file of the UNet alone (with --preset)",
    )  # fmt: skip
    add_checkpoint_options(parser)


def run(args: argparse.Namespace) -> int:
    from vgrt.export.exporter import ExportSettings, export
    from vgrt.export.manifest import read_manifest
    from vgrt.models.source import ModelSource
    from vgrt.precision import export_dtype

    settings = ExportSettings(
        preset=ModelSource.from_options(args.preset, args.weights).preset, components=args.components, features=args.features, opset=args.opset,
        dtype=export_dtype(args.precision),
        attention_form=args.attention_form, seed=args.seed, weights=args.weights, allow_pickle=args.allow_pickle,
        adapters=tuple(args.adapter or ()),
    )  # fmt: skip
    settings.validate()
    out = export(args.out, settings)
    print(f"wrote {out}/manifest.json")
    for entry in read_manifest(out).components.values():
        print(f"  {entry.file}: inputs {', '.join(t.name for t in entry.spec.inputs)}")
        if entry.fp32_ops:
            print(f"    kept in fp32: {', '.join(entry.fp32_ops)}")
    return 0
