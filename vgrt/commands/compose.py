"""Compose an image from visual prompts with one of the methods (engines exported on first use)."""

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output image (.png or .jpg); written only on success")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--preset", default="tiny", help="tiny, sd15, sd21 or sdxl (default: tiny, random weights)")
    parser.add_argument("--weights", help="local diffusers folder with real weights (unet/, vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", help="WxH to resize the inputs to, e.g. 512x512 (default: the images' size)")
    parser.add_argument("--cache", help="export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", required=True)
    mca = methods.add_parser("mca-ctrl", help="MCA-Ctrl: put a subject into a scene (edit) or a new image (generate)")
    mca.add_argument("--subject", required=True, help="subject image")
    mca.add_argument("--subject-mask", required=True, help="mask of the subject in its image (non-zero = inside)")
    mca.add_argument("--condition", required=True, help="scene image (edit) / size reference (generate)")
    mca.add_argument("--region-mask", required=True, help="where the subject goes (non-zero = inside)")
    mca.add_argument("--mode", default="edit", choices=("edit", "generate"))
    mca.add_argument("--prompt", default="", help="text for the target branch")
    _common(mca)
    loc = methods.add_parser("locref", help="LocRef-Diffusion: reference images placed in boxes, from a prompt")
    loc.add_argument("--prompt", required=True)
    loc.add_argument("--reference", action="append", required=True, help="reference image; repeat, one per --box")
    loc.add_argument("--box", action="append", required=True, help="x0,y0,x1,y1 in output pixels; one per --reference")
    _common(loc)


def _size(text: str | None) -> tuple[int, int] | None:
    from vgrt.errors import InvalidInputError

    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"--size {text!r} is not WxH, e.g. 512x512") from None
    return width, height


def _image_and_mask(image_path: str, mask_path: str, size: tuple[int, int] | None, name: str):
    import torch.nn.functional as F

    from vgrt.runtime.images import load_image, load_mask

    image = load_image(image_path)
    mask = load_mask(mask_path, (image.shape[3], image.shape[2]), name=f"{name} mask")
    if size is not None:
        image = load_image(image_path, size)
        mask = F.interpolate(mask, size=(size[1], size[0]), mode="nearest")
    return image, mask


def _mca_ctrl(args: argparse.Namespace):
    from vgrt.runtime.methods import mca_ctrl

    size = _size(args.size)
    subject, subject_mask = _image_and_mask(args.subject, args.subject_mask, size, "subject")
    condition, region_mask = _image_and_mask(args.condition, args.region_mask, size, "condition")
    request = mca_ctrl.McaCtrlRequest(
        subject, subject_mask, condition, region_mask, mode=args.mode, prompt=args.prompt,
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
    )  # fmt: skip
    return mca_ctrl.compose, request, (condition.shape[3], condition.shape[2])


def _locref(args: argparse.Namespace):
    from vgrt.errors import InvalidInputError
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods import locref

    if args.size is None:
        raise InvalidInputError("locref needs the output size: add --size WxH, e.g. --size 512x512")
    width, height = _size(args.size)
    references = tuple(load_image(path) for path in args.reference)
    boxes = tuple(Box.parse(text) for text in args.box)
    request = locref.LocRefRequest(
        args.prompt, references, boxes, width, height, steps=args.steps, guidance_scale=args.guidance, seed=args.seed
    )
    return locref.compose, request, (width, height)


METHODS = {"mca-ctrl": _mca_ctrl, "locref": _locref}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vgrt.errors import InvalidInputError
    from vgrt.models.source import ModelSource
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.images import save_image

    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise InvalidInputError(f"--out {args.out!r} must end in .png or .jpg")
    compose, request, (width, height) = METHODS[args.method](args)
    request.validate()
    source = ModelSource(args.preset, weights=args.weights)  # --seed is the sampling seed, not the weights'
    with Composer(source, args.backend, cache=args.cache) as composer:
        composer.check_image_size(width, height)
        result = compose(composer, request)
    save_image(result.image, args.out)
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.times.seconds.items())
    print(f"wrote {args.out} ({stages})")
    if args.weights is None:
        print("note: preset weights are random, so the image is noise-like; use --weights for real images")
    return 0
