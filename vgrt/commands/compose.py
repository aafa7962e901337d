"""Compose an image from visual prompts with one of the methods (engines exported on first use)."""

import argparse

BACKENDS = ("onnxruntime", "torch", "openvino")
OPENVINO_PRECISIONS = ("fp32", "bf16")  # vgrt.engines.openvino_runner.PRECISIONS, without importing OpenVINO here


def _common(parser: argparse.ArgumentParser, steps: int = 50) -> None:
    parser.add_argument("--out", required=True, help="output image (.png or .jpg); written only on success")
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    parser.add_argument(
        "--precision", choices=OPENVINO_PRECISIONS,
        help="openvino only: the CPU plugin's arithmetic (default: fp32; bf16 needs a CPU with BF16 units)",
    )  # fmt: skip
    parser.add_argument("--preset", default="tiny", help="tiny, sd15, sd21 or sdxl (default: tiny, random weights)")
    parser.add_argument(
        "--weights", help="local diffusers folder with real weights (unet/, vae/, text_encoder/, tokenizer/)"
    )
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the starting noise (methods that start from noise)"
    )
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
    aic = methods.add_parser("aicomposer", help="AIComposer: a foreground object placed into a background image")
    aic.add_argument("--foreground", required=True, help="image holding the object")
    aic.add_argument("--foreground-mask", required=True, help="mask of the object in its image (non-zero = inside)")
    aic.add_argument("--background", required=True, help="scene image the object goes into")
    place = aic.add_mutually_exclusive_group(required=True)
    place.add_argument("--placement-mask", help="mask on the background whose bounding box receives the object")
    place.add_argument("--box", help="x0,y0,x1,y1 on the background (pixels, after --size) that receives the object")
    aic.add_argument("--prompt", default="", help="text for the image-token steps")
    _common(aic, steps=20)
    loc = methods.add_parser("locref", help="LocRef-Diffusion: reference images placed in boxes, from a prompt")
    loc.add_argument("--prompt", required=True)
    loc.add_argument("--reference", action="append", required=True, help="reference image; repeat, one per --box")
    loc.add_argument("--box", action="append", required=True, help="x0,y0,x1,y1 in output pixels; one per --reference")
    _common(loc)
    vcf = methods.add_parser("vcf", help="Visual Concept Fusion: a prompt plus a reference image's CLIP tokens")
    vcf.add_argument("--prompt", required=True)
    vcf.add_argument("--reference", required=True, help="image whose style, colours and content guide the prompt")
    vcf.add_argument("--fusion", default="concat", choices=("concat", "blend", "xattn"), help="default: concat")
    vcf.add_argument("--alpha", type=float, default=0.1, help="image weight of blend and xattn fusion")
    vcf.add_argument("--tokens", default="all", choices=("all", "patches", "cls"), help="CLIP image tokens to fuse")
    vcf.add_argument("--pno-steps", type=int, default=0, help="Prompt-Noise Optimization iterations (0: off)")
    vcf.add_argument("--pno-lr", type=float, default=1e-2, help="PNO learning rate of the text embedding and noise")
    _common(vcf)
    vcf.set_defaults(guidance=9.0)  # the VCF code's default scale
    vp = methods.add_parser(
        "visual-prompts", help="object-level visual prompts: objects given as images, composed",
        description="The output size is --size WxH, by default the preset's native size (512x512 for sd15).",
    )  # fmt: skip
    vp.add_argument("--object", action="append", required=True, help="object image; repeat, one per object")
    vp.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in output pixels, one per --object "
                    "(default: the layout of a first pass)")  # fmt: skip
    vp.add_argument("--prompt", default="", help="text for the composition")
    vp.add_argument("--guidance-steps", type=int, default=5, help="gradient steps on the appearance tokens (0: none)")
    vp.add_argument("--guidance-lr", type=float, default=0.01, help="learning rate of those steps")
    _common(vp)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _size(text: str | None) -> tuple[int, int] | None:
    from vgrt.errors import InvalidInputError

    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"--size {text!r} is not WxH, e.g. 512x512") from None
    return width, height


def _output_size(args: argparse.Namespace, preset, image_path: str | None = None) -> tuple[int, int]:
    """--size, else the size of the image at `image_path` (from its header); checked against the preset's
    engines before any image is decoded or resized."""
    from vgrt.runtime.images import check_preset_image_size, image_size

    size = _size(args.size)
    what = f"--size {args.size} ({preset.name} preset)"
    if size is None:
        size, what = image_size(image_path), f"image {image_path!r} (no --size given; {preset.name} preset)"
    check_preset_image_size(preset, *size, what=what)
    return size


def _image_and_mask(image_path: str, mask_path: str, size: tuple[int, int] | None, name: str):
    """The image resized to `size` (None: as it is) and its mask, checked at the image's own size first."""
    import torch.nn.functional as F

    from vgrt.runtime.images import image_size, load_image, load_mask

    original = image_size(image_path)
    mask = load_mask(mask_path, original, name=f"{name} mask")
    image = load_image(image_path, size)
    if size is not None and size != original:
        mask = F.interpolate(mask, size=(size[1], size[0]), mode="nearest")
    return image, mask


def _mca_ctrl(args: argparse.Namespace, preset):
    from vgrt.runtime.methods import mca_ctrl

    width, height = _output_size(args, preset, args.condition)
    size = _size(args.size)
    subject, subject_mask = _image_and_mask(args.subject, args.subject_mask, size, "subject")
    condition, region_mask = _image_and_mask(args.condition, args.region_mask, size, "condition")
    request = mca_ctrl.McaCtrlRequest(
        subject, subject_mask, condition, region_mask, mode=args.mode, prompt=args.prompt,
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
    )  # fmt: skip
    return mca_ctrl.compose, request, (width, height)


def _aicomposer(args: argparse.Namespace, preset):
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods import aicomposer

    width, height = _output_size(args, preset, args.background)
    placement = None if args.box is None else Box.parse(args.box).mask(width, height)
    foreground, foreground_mask = _image_and_mask(args.foreground, args.foreground_mask, None, "foreground")
    if placement is None:
        background, placement = _image_and_mask(args.background, args.placement_mask, _size(args.size), "placement")
    else:
        background = load_image(args.background, (width, height))
    request = aicomposer.AIComposerRequest(
        foreground,
        foreground_mask,
        background,
        placement,
        prompt=args.prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
    )
    return aicomposer.compose, request, (width, height)


def _locref(args: argparse.Namespace, preset):
    from vgrt.errors import InvalidInputError
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods import locref

    if args.size is None:
        raise InvalidInputError("locref needs the output size: add --size WxH, e.g. --size 512x512")
    width, height = _output_size(args, preset)
    locref.check_reference_count(len(args.reference), preset.profile)
    boxes = tuple(Box.parse(text) for text in args.box)
    for box in boxes:
        box.check_inside(width, height)
    references = tuple(load_image(path) for path in args.reference)
    request = locref.LocRefRequest(
        args.prompt, references, boxes, width, height, steps=args.steps, guidance_scale=args.guidance, seed=args.seed
    )
    return locref.compose, request, (width, height)


def _vcf(args: argparse.Namespace, preset):
    from vgrt.runtime.images import load_image
    from vgrt.runtime.methods import vcf
    from vgrt.runtime.methods.pno import PnoSettings

    width, height = _output_size(args, preset, args.reference)
    pno = None
    if args.pno_steps != 0:
        pno = PnoSettings(iterations=args.pno_steps, lr_prompt=args.pno_lr, lr_noise=args.pno_lr, seed=args.seed)
    reference = load_image(args.reference)
    request = vcf.VcfRequest(
        args.prompt, reference, width, height, fusion=args.fusion, alpha=args.alpha, tokens=args.tokens,
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed, pno=pno,
    )  # fmt: skip
    return vcf.compose, request, (width, height)


def _visual_prompts(args: argparse.Namespace, preset):
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods import visual_prompts

    native = preset.profile.latent.opt * preset.vae_factor
    width, height = _output_size(args, preset) if args.size is not None else (native, native)
    visual_prompts.check_object_count(len(args.object), preset.profile)
    boxes = tuple(Box.parse(text) for text in args.box)
    objects = tuple(load_image(path) for path in args.object)
    request = visual_prompts.VisualPromptsRequest(
        objects, width, height, prompt=args.prompt, boxes=boxes, steps=args.steps, guidance_scale=args.guidance,
        guidance_steps=args.guidance_steps, guidance_lr=args.guidance_lr, seed=args.seed,
    )  # fmt: skip
    return visual_prompts.compose, request, (width, height)


METHODS = {
    "mca-ctrl": _mca_ctrl, "aicomposer": _aicomposer, "locref": _locref, "vcf": _vcf, "visual-prompts": _visual_prompts,
}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vgrt.checks import check_output_file, check_seed, check_writable_folder
    from vgrt.export.cache import cache_root
    from vgrt.models.presets import get_preset
    from vgrt.models.source import ModelSource
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.images import save_image

    # Everything a user can get wrong is refused here, before any image is decoded or engine exported.
    out = check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    check_writable_folder(args.cache or cache_root(), "--cache" if args.cache else "the cache (--cache or $VGRT_CACHE)")
    check_seed(args.seed, "--seed")
    runner_options = _runner_options(args)
    preset = get_preset(args.preset)
    compose, request, (width, height) = METHODS[args.method](args, preset)
    request.validate()
    source = ModelSource(args.preset, weights=args.weights)  # --seed is the sampling seed, not the weights'
    with Composer(source, args.backend, cache=args.cache, runner_options=runner_options) as composer:
        composer.check_image_size(width, height)
        result = compose(composer, request)
        record = provenance(args, request, composer)
    save_image(result.image, out, record)
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.times.seconds.items())
    print(f"wrote {out} ({stages})")
    if args.weights is None:
        print("note: preset weights are random, so the image is noise-like; use --weights for real images")
    return 0


def _runner_options(args: argparse.Namespace) -> dict[str, str]:
    """The runner settings --precision gives; refused on backends without it, and bf16 on a CPU without
    BF16 units, before any export."""
    from vgrt.errors import InvalidInputError

    if args.precision is None:
        return {}
    if args.backend != "openvino":
        raise InvalidInputError(
            f"--precision {args.precision} is an openvino option, and the backend is {args.backend}; "
            "add --backend openvino, or leave --precision out"
        )
    from vgrt._lazy import require
    from vgrt.engines.openvino_runner import check_precision

    check_precision(require("openvino").Core(), args.precision)
    return {"precision": args.precision}


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
        "vgrt.dtype": composer.dtype,
        "vgrt.preset": source.preset,
        "vgrt.weights": str(Path(source.weights).resolve()) if source.weights else f"random, seed {source.seed}",
    }
    if composer.backend == "openvino":
        record["vgrt.precision"] = composer.runner_options.get("precision", "fp32")
    if hasattr(request, "seed"):  # AIComposer starts from an inversion, not from seeded noise
        record["vgrt.seed"] = str(request.seed)
    return record
