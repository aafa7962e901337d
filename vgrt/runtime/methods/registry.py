"""Every composition method, declared once: its name, module, request type, UNet features, the other
components it runs, the inputs its request is built from, and the requests `vgrt bench compose` times.

`vgrt compose` makes one subcommand per entry and `vgrt bench compose` one case per benchmark; a server
builds requests the same way, from a plain mapping of the inputs (paths, numbers, text):

    method = get_method("locref")
    request = method.request({"prompt": "a ball", "reference": ["ball.png"], "box": ["0,0,16,16"],
                              "size": "32x32"}, get_preset("tiny"))
    image = method.compose(composer, request).image

Importing this module is light: a method's module (and torch) load when its `compose`, its request type
or a request is first asked for, so `vgrt --help` stays fast. To add a method, write its module (a
request dataclass with `validate()` and `compose(composer, request)`) and add one `Method` to METHODS.
"""

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgrt.errors import InvalidInputError
from vgrt.models.presets import Preset, vision_tokens

Values = dict[str, Any]  # option name -> value, every option present (defaults filled in)


@dataclass(frozen=True)
class Option:
    """One input of a request: the CLI option `--name` (dashes for underscores) and the key `name` of the
    mapping `Method.request` takes. Image, mask and box inputs are file paths or text, read when the
    request is built.

    repeated: given once per item (`--reference a.png --reference b.png`); its value is a sequence.
    one_of: options sharing this group name are alternatives; exactly one of them is given.
    """

    name: str
    help: str
    type: type = str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    repeated: bool = False
    one_of: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def read(self, value: Any) -> Any:
        """`value` as this option's type (a tuple when repeated); None: the default, or refused if required."""
        if value is None:
            if self.required:
                raise InvalidInputError(f"{self.flag} is required: {self.help}")
            return () if self.repeated else self.default
        if self.repeated:
            if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
                raise InvalidInputError(f"{self.flag} takes a list (one item per {self.flag}), got {value!r}")
            return tuple(self._convert(item) for item in value)
        return self._convert(value)

    def _convert(self, value: Any) -> Any:
        kind = _KINDS[self.type]
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise InvalidInputError(f"{self.flag} {value!r} is not {kind}")  # int() would truncate 2.5
        try:
            converted = self.type(value)
        except ValueError:
            raise InvalidInputError(f"{self.flag} {value!r} is not {kind}") from None
        if self.choices and converted not in self.choices:
            raise InvalidInputError(f"{self.flag} {converted!r} is not one of: {', '.join(self.choices)}")
        return converted


_KINDS = {str: "text", int: "a whole number", float: "a number"}


@dataclass(frozen=True)
class Work:
    """How much a benchmark request runs: sampling steps, and gradient steps (PNO's iterations, the
    guidance steps of visual prompts; None: the method's default)."""

    steps: int
    gradient_steps: int | None = None


@dataclass(frozen=True)
class Examples:
    """The images `vgrt examples` writes (vgrt.runtime.examples: a red disc on a light background, sky
    over grass, their masks and a box), `size` x `size`, in `folder`, used with `preset`."""

    folder: Path
    size: int
    preset: Preset

    def file(self, name: str) -> str:
        return str(self.folder / name)

    @property
    def box(self) -> str:
        return (self.folder / "box.txt").read_text().strip()

    @property
    def size_text(self) -> str:
        return f"{self.size}x{self.size}"


Benchmark = Callable[[Examples, Work], Values]  # the request's inputs, as Method.request takes them


@dataclass(frozen=True)
class Method:
    """One composition method.

    name: as `vgrt compose` spells it. module: its module in vgrt.runtime.methods, with `compose` and
    the request dataclass `request_class`. features: the UNet's feature set. components: the encoders
    and adapters it runs beside that UNet, and 'unet' where it runs the plain UNet too (for steps with
    every feature gated off, such as an inversion). options: the inputs of its request. build: the request from
    complete, checked option values and the preset. benchmarks: the requests `vgrt bench compose` times,
    by case name, as option values on the example images.
    """

    name: str
    summary: str
    module: str
    request_class: str
    features: str
    components: tuple[str, ...]
    options: tuple[Option, ...]
    build: Callable[[Values, Preset], Any]
    benchmarks: Mapping[str, Benchmark]
    description: str = ""

    @property
    def compose(self) -> Callable[[Any, Any], Any]:
        """compose(composer, request) -> the method's Composition."""
        return self._module().compose

    @property
    def request_type(self) -> type:
        return getattr(self._module(), self.request_class)

    def _module(self):
        return importlib.import_module(f"vgrt.runtime.methods.{self.module}")

    def request(self, given: Mapping[str, Any], preset: Preset) -> Any:
        """The validated request from `given` (option name -> value; missing optional ones take their
        defaults). Sizes are checked from the images' headers before any image is decoded."""
        request = self.build(self.values(given), preset)
        request.validate()
        return request

    def values(self, given: Mapping[str, Any]) -> Values:
        """`given` checked against the options, converted to their types and completed with defaults."""
        names = [option.name for option in self.options]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InvalidInputError(
                f"{self.name} takes no input {', '.join(map(repr, unknown))}; its inputs are: {', '.join(names)}"
            )
        values = {option.name: option.read(given.get(option.name)) for option in self.options}
        for group in dict.fromkeys(option.one_of for option in self.options if option.one_of):
            alternatives = [option.flag for option in self.options if option.one_of == group]
            chosen = [o.flag for o in self.options if o.one_of == group and values[o.name] is not None]
            if len(chosen) != 1:
                raise InvalidInputError(
                    f"{self.name} needs exactly one of {' or '.join(alternatives)}, got {len(chosen)}"
                    + (f" ({', '.join(chosen)})" if chosen else "")
                )
        return values


def common_options(steps: int = 50, guidance: float = 7.5) -> tuple[Option, ...]:
    """The request inputs every method takes; `steps` and `guidance` default to the method's own."""
    return (
        Option("steps", "sampling steps", int, default=steps),
        Option("guidance", "classifier-free guidance scale", float, default=guidance),
        Option("seed", "seed of the starting noise (methods that start from noise)", int, default=0),
        Option("size", "WxH to resize the inputs to, e.g. 512x512 (default: the images' size)"),
    )


def gradient_precision_option(whose: str) -> Option:
    """--gradient-precision of a method with gradient steps (`whose`: the steps' owner, for the help)."""
    return Option(
        "gradient_precision",
        f"arithmetic of {whose} gradient steps in PyTorch: fp32, or bf16 autocast (CPUs with bf16 units, GPUs; "
        "not faster on every CPU: on one without AMX it was slower)",
        default="fp32",
        choices=("fp32", "bf16"),  # GRADIENT_PRECISIONS of vgrt.runtime.gradient_precision, which loads torch
    )


# Sizes and images, read from the option values. Messages name the CLI flags, which are also the inputs' names.


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"--size {text!r} is not WxH, e.g. 512x512") from None
    return width, height


def _output_size(values: Values, preset: Preset, image_path: str | None = None) -> tuple[int, int]:
    """--size, else the size of the image at `image_path` (from its header); checked against the preset's
    engines before any image is decoded or resized."""
    from vgrt.runtime.images import check_preset_image_size, image_size

    size = _size(values["size"])
    what = f"--size {values['size']} ({preset.name} preset)"
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


# MCA-Ctrl


def _mca_ctrl(values: Values, preset: Preset):
    from vgrt.runtime.methods.mca_ctrl import McaCtrlRequest
    from vgrt.runtime.methods.subject_localization import LocalizationSettings

    _output_size(values, preset, values["condition"])
    size = _size(values["size"])
    subject, subject_mask = _image_and_drawn_mask(values["subject"], values["subject_mask"], size, "subject")
    condition, region_mask = _image_and_drawn_mask(values["condition"], values["region_mask"], size, "condition")
    localization = LocalizationSettings(
        grounding=values["grounding"], sam=values["sam"], box_threshold=values["box_threshold"],
        text_threshold=values["text_threshold"], detections=values["detections"],
    )  # fmt: skip
    return McaCtrlRequest(
        subject, subject_mask, condition, region_mask, mode=values["mode"], prompt=values["prompt"],
        steps=values["steps"], guidance_scale=values["guidance"], seed=values["seed"],
        subject_text=values["subject_text"], region_text=values["region_text"], localization=localization,
    )  # fmt: skip


def _image_and_drawn_mask(image_path: str, mask_path: str | None, size: tuple[int, int] | None, name: str):
    """The image and its mask; the mask None where a text names it instead (found when composing)."""
    if mask_path is not None:
        return _image_and_mask(image_path, mask_path, size, name)
    from vgrt.runtime.images import load_image

    return load_image(image_path, size), None


def _mca_ctrl_benchmark(examples: Examples, work: Work) -> Values:
    return {
        "subject": examples.file("subject.png"), "subject_mask": examples.file("subject_mask.png"),
        "condition": examples.file("scene.png"), "region_mask": examples.file("region_mask.png"),
        "prompt": "a red ball", "steps": work.steps,
    }  # fmt: skip


MCA_CTRL = Method(
    "mca-ctrl",
    "MCA-Ctrl: put a subject into a scene (edit) or a new image (generate)",
    module="mca_ctrl",
    request_class="McaCtrlRequest",
    features="mutual",
    components=("vae_encoder", "text_encoder", "vae_decoder", "unet"),
    options=(
        Option("subject", "subject image", required=True),
        Option("subject_mask", "mask of the subject in its image (non-zero = inside)", one_of="subject_mask"),
        Option(
            "subject_text",
            "what the subject is, found in the subject image (Grounding DINO + SAM)",
            one_of="subject_mask",
        ),
        Option("condition", "scene image (edit) / size reference (generate)", required=True),
        Option("region_mask", "where the subject goes (non-zero = inside)", one_of="region_mask"),
        Option(
            "region_text",
            "what marks where the subject goes, found in the condition image (Grounding DINO + SAM)",
            one_of="region_mask",
        ),
        Option("mode", "edit (into the condition image) or generate", default="edit", choices=("edit", "generate")),
        Option("prompt", "text for the target branch", default=""),
        # The Subject Localization Module (vgrt.runtime.methods.subject_localization), the released code's defaults
        Option("grounding", "Grounding DINO transformers folder for the texts (default: WEIGHTS/grounding_dino)"),
        Option("sam", "SAM transformers folder for the texts (default: WEIGHTS/sam)"),
        Option("box_threshold", "Grounding DINO score a detection must pass", float, default=0.3),
        Option("text_threshold", "score of the words that name a detection (logged)", float, default=0.25),
        Option(
            "detections",
            "of several detections: the best one's mask, or the union of all",
            default="best",
            choices=("best", "union"),
        ),
        *common_options(),
    ),
    build=_mca_ctrl,
    benchmarks={"mca-ctrl": _mca_ctrl_benchmark},
)


# AIComposer


def _aicomposer(values: Values, preset: Preset):
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods.aicomposer import AIComposerRequest

    width, height = _output_size(values, preset, values["background"])
    placement = None if values["box"] is None else Box.parse(values["box"]).mask(width, height)
    foreground, foreground_mask = _image_and_mask(values["foreground"], values["foreground_mask"], None, "foreground")
    if placement is None:
        background, placement = _image_and_mask(
            values["background"], values["placement_mask"], _size(values["size"]), "placement"
        )
    else:
        background = load_image(values["background"], (width, height))
    return AIComposerRequest(
        foreground, foreground_mask, background, placement, prompt=values["prompt"], steps=values["steps"],
        guidance_scale=values["guidance"],
    )  # fmt: skip


def _aicomposer_benchmark(examples: Examples, work: Work) -> Values:
    return {
        "foreground": examples.file("subject.png"), "foreground_mask": examples.file("subject_mask.png"),
        "background": examples.file("scene.png"), "placement_mask": examples.file("region_mask.png"),
        "prompt": "a red ball", "steps": work.steps,
    }  # fmt: skip


AICOMPOSER = Method(
    "aicomposer",
    "AIComposer: a foreground object placed into a background image",
    module="aicomposer",
    request_class="AIComposerRequest",
    features="extra_tokens",
    components=("vae_encoder", "vae_decoder", "text_encoder", "image_encoder", "image_proj", "fusion_mlp", "unet"),
    options=(
        Option("foreground", "image holding the object", required=True),
        Option("foreground_mask", "mask of the object in its image (non-zero = inside)", required=True),
        Option("background", "scene image the object goes into", required=True),
        Option("placement_mask", "mask on the background whose bounding box receives the object", one_of="placement"),
        Option(
            "box", "x0,y0,x1,y1 on the background (pixels, after --size) that receives the object", one_of="placement"
        ),
        Option("prompt", "text for the image-token steps", default=""),
        *common_options(steps=20),
    ),
    build=_aicomposer,
    benchmarks={"aicomposer": _aicomposer_benchmark},
)


# LocRef-Diffusion


def _locref(values: Values, preset: Preset):
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods.locref import LocRefRequest, check_reference_count

    if values["size"] is None:
        raise InvalidInputError("locref needs the output size: add --size WxH, e.g. --size 512x512")
    width, height = _output_size(values, preset)
    check_reference_count(len(values["reference"]), preset.profile)
    boxes = tuple(Box.parse(text) for text in values["box"])
    for box in boxes:
        box.check_inside(width, height)
    references = tuple(load_image(path) for path in values["reference"])
    return LocRefRequest(
        values["prompt"], references, boxes, width, height, steps=values["steps"], guidance_scale=values["guidance"],
        seed=values["seed"],
    )  # fmt: skip


def _locref_benchmark(examples: Examples, work: Work) -> Values:
    return {
        "prompt": "a red ball on the grass", "reference": [examples.file("subject.png")], "box": [examples.box],
        "size": examples.size_text, "steps": work.steps,
    }  # fmt: skip


LOCREF = Method(
    "locref",
    "LocRef-Diffusion: reference images placed in boxes, from a prompt",
    module="locref",
    request_class="LocRefRequest",
    features="extra_tokens,regions",
    components=("text_encoder", "image_encoder", "appearance_net", "vae_decoder"),
    options=(
        Option("prompt", "text of the whole image", required=True),
        Option("reference", "reference image; repeat, one per --box", required=True, repeated=True),
        Option("box", "x0,y0,x1,y1 in output pixels; one per --reference", required=True, repeated=True),
        *common_options(),
    ),
    build=_locref,
    benchmarks={"locref": _locref_benchmark},
)


# Visual Concept Fusion


def _vcf(values: Values, preset: Preset):
    from vgrt.runtime.images import load_image
    from vgrt.runtime.methods.pno import PnoSettings
    from vgrt.runtime.methods.vcf import VcfRequest, check_preset

    check_preset(preset)
    width, height = _output_size(values, preset, values["reference"])
    pno = None
    if values["pno_steps"] != 0:
        lr = values["pno_lr"]
        pno = PnoSettings(
            iterations=values["pno_steps"], lr_prompt=lr, lr_noise=lr, seed=values["seed"],
            precision=values["gradient_precision"],
        )  # fmt: skip
    return VcfRequest(
        values["prompt"], load_image(values["reference"]), width, height, fusion=values["fusion"],
        alpha=values["alpha"], tokens=values["tokens"], steps=values["steps"], guidance_scale=values["guidance"],
        seed=values["seed"], pno=pno,
    )  # fmt: skip


def _vcf_benchmark(examples: Examples, work: Work) -> Values:
    return {
        "prompt": "a red ball on the grass", "reference": examples.file("subject.png"),
        "tokens": _vcf_tokens(examples.preset), "steps": work.steps,
    }  # fmt: skip


def _vcf_tokens(preset: Preset) -> str:
    """Every penultimate image token, as the code concatenates them, where the preset's UNet profile takes
    that context; else the class token alone (the SD 1.5 and SDXL profiles stop at 154 tokens)."""
    text_tokens = preset.text_encoder["max_position_embeddings"]
    return "all" if text_tokens + vision_tokens(preset.image_encoder) <= preset.profile.context.max else "cls"


def _vcf_pno_benchmark(examples: Examples, work: Work) -> Values:
    from vgrt.runtime.methods.pno import PnoSettings

    iterations = PnoSettings.iterations if work.gradient_steps is None else work.gradient_steps
    return {**_vcf_benchmark(examples, work), "pno_steps": iterations}


VCF = Method(
    "vcf",
    "Visual Concept Fusion: a prompt plus a reference image's CLIP tokens",
    module="vcf",
    request_class="VcfRequest",
    features="none",
    components=("text_encoder", "image_encoder", "aligner", "vae_decoder"),
    options=(
        Option("prompt", "text of the image", required=True),
        Option("reference", "image whose style, colours and content guide the prompt", required=True),
        Option("fusion", "default: concat", default="concat", choices=("concat", "blend", "xattn")),
        Option("alpha", "image weight of blend and xattn fusion", float, default=0.1),
        Option("tokens", "CLIP image tokens to fuse", default="all", choices=("all", "patches", "cls")),
        Option("pno_steps", "Prompt-Noise Optimization iterations (0: off)", int, default=0),
        Option("pno_lr", "PNO learning rate of the text embedding and noise", float, default=1e-2),
        gradient_precision_option("PNO's"),
        *common_options(guidance=9.0),  # the VCF code's default scale
    ),
    build=_vcf,
    benchmarks={"vcf": _vcf_benchmark, "vcf-pno": _vcf_pno_benchmark},
    description="SD 1.x and 2.x presets only: SDXL ones are refused (the released aligner and code are SD 2.1's).",
)


# Object-level visual prompts


def _visual_prompts(values: Values, preset: Preset):
    from vgrt.runtime.images import Box, load_image
    from vgrt.runtime.methods.visual_prompts import VisualPromptsRequest, check_object_count

    native = preset.profile.latent.opt * preset.vae_factor
    width, height = _output_size(values, preset) if values["size"] is not None else (native, native)
    check_object_count(len(values["object"]), preset.profile)
    boxes = tuple(Box.parse(text) for text in values["box"])
    objects = tuple(load_image(path) for path in values["object"])
    return VisualPromptsRequest(
        objects, width, height, prompt=values["prompt"], boxes=boxes, steps=values["steps"],
        guidance_scale=values["guidance"], guidance_steps=values["guidance_steps"], guidance_lr=values["guidance_lr"],
        seed=values["seed"], gradient_precision=values["gradient_precision"],
    )  # fmt: skip


def _visual_prompts_benchmark(examples: Examples, work: Work) -> Values:
    from vgrt.runtime.methods.visual_prompts import VisualPromptsRequest

    guidance = VisualPromptsRequest.guidance_steps if work.gradient_steps is None else work.gradient_steps
    return {
        "object": [examples.file("subject.png")], "size": examples.size_text, "prompt": "a red ball on the grass",
        "steps": work.steps, "guidance_steps": min(work.steps, guidance),
    }  # fmt: skip


VISUAL_PROMPTS = Method(
    "visual-prompts",
    "object-level visual prompts: objects given as images, composed",
    module="visual_prompts",
    request_class="VisualPromptsRequest",
    features="extra_tokens,kv_source,regions,probes",
    components=("text_encoder", "image_encoder", "layout_adapter", "appearance_adapter", "vae_decoder"),
    options=(
        Option("object", "object image; repeat, one per object", required=True, repeated=True),
        Option(
            "box", "x0,y0,x1,y1 in output pixels, one per --object (default: the layout of a first pass)", repeated=True
        ),
        Option("prompt", "text for the composition", default=""),
        Option("guidance_steps", "gradient steps on the appearance tokens (0: none)", int, default=5),
        Option("guidance_lr", "learning rate of those steps", float, default=0.01),
        gradient_precision_option("the guidance's"),
        *common_options(),
    ),
    build=_visual_prompts,
    benchmarks={"visual-prompts": _visual_prompts_benchmark},
    description="The output size is --size WxH, by default the preset's native size (512x512 for sd15).",
)


METHODS: dict[str, Method] = {method.name: method for method in (MCA_CTRL, AICOMPOSER, LOCREF, VCF, VISUAL_PROMPTS)}

# Benchmark case name -> (its method, its request's inputs on the example images).
BENCHMARKS: dict[str, tuple[Method, Benchmark]] = {
    case: (method, values) for method in METHODS.values() for case, values in method.benchmarks.items()
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidInputError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}") from None
