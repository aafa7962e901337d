"""MCA-Ctrl (CVPR 2025): subject composition by multi-party collaborative attention control.

Follows the released code (yanghan-yh/MCA-Ctrl, `mcactrl/mca_p2p.py`, `diffuser_utils.py`), which
differs from the paper's text in places; the differences that matter here:
- Edit mode: one batch holds three branches, condition (slot 0), subject (slot 1) and target (slot 2),
  times two for classifier-free guidance. The reference branches are overwritten every step with their
  DDIM-inverted latents. SAGI (steps [0, 5), every block): the target's foreground output is the
  subject branch's attention over subject keys, its background the condition branch's attention over
  keys outside the region (queries from those branches, not the target). SALQ (steps >= 5, blocks
  9-15 of SD 1.5's 16, scaled for other layouts): the target's own queries over the same keys. After
  each step the target is blended with the condition's inverted latent outside the dilated region
  ("LocalBlend"), with the code's index `inverted[-1 - i]` (the latent of the step's input level).
- The inversion uses the empty prompt with guidance 7.5 on equal prompts in the code, which equals
  guidance 1 at half the cost; that is what runs here.
- Generate mode: branches reference (subject) and target, the target starting from noise. The code
  derives the target mask inside the UNet from accumulated cross-attention maps; this runtime takes
  the region mask instead (the `probes` output covers extra-token maps, not the text-token maps
  this would need), and drops the code's soft key bias. SAGI runs on steps (0, 5), SALQ from step 5
  on every block.
- Masks from text (the paper's Subject Localization Module, Grounding DINO + SAM): made before the
  method's work by vgrt.runtime.methods.subject_localization, then used as drawn masks are (the region
  dilated as above).
- SDXL (the code is SD 1.5's; ours): every branch also gets its prompt's pooled embedding and the
  time_ids, the unconditional half is SDXL's pipeline's (Composer.unconditional), and the SALQ block
  fraction applies to SDXL's transformer blocks.
"""

from dataclasses import dataclass, field, replace

import torch

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.models.processors import MUTUAL_GATE
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning, unet_inputs
from vgrt.runtime.inversion import InversionSettings, invert
from vgrt.runtime.methods.common import (
    Composition,
    check_pair,
    decode,
    dilate,
    layer_gates,
    repeat_rows,
    split_rows,
    start,
    to_latent_grid,
)
from vgrt.runtime.methods.subject_localization import LocalizationSettings
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

MODES = ("edit", "generate")
FEATURES = "mutual"
COMPONENTS = ("vae_encoder", "text_encoder", "vae_decoder", "unet")  # besides the mutual UNet; the plain one inverts
SAGI_END_STEP = 5  # code: self_replace_steps=0.1 of 50 steps
EDIT_SALQ_FIRST_BLOCK = 9 / 16  # code: START_LAYER=9 of SD 1.5's 16 transformer blocks
REGION_DILATION = 5  # code: cv2.dilate(mask, np.ones((3, 3)), iterations=5) in edit mode


@dataclass(frozen=True)
class McaCtrlRequest:
    """Images [1, 3, H, W] in [-1, 1], masks [1, 1, H, W] with 1 inside; all of one size.

    Args:
        subject, subject_mask: the subject image and where the subject is in it.
        condition, region_mask: the scene, and where the subject goes (edit) / the target region
            (generate; the condition image is then only the size reference).
        mode: 'edit' (insert into the condition image) or 'generate' (new image from the prompt).
        prompt: text for the target branch; '' in the code's edit examples.
        subject_text, region_text: instead of a mask (None there), what to find in the subject image /
            the condition image: the paper's Subject Localization Module (Grounding DINO + SAM, see
            vgrt.runtime.methods.subject_localization) makes the mask, settings in `localization`.
    """

    subject: torch.Tensor
    subject_mask: torch.Tensor | None
    condition: torch.Tensor
    region_mask: torch.Tensor | None
    mode: str = "edit"
    prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    subject_text: str | None = None
    region_text: str | None = None
    localization: LocalizationSettings = field(default_factory=LocalizationSettings)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"unknown MCA-Ctrl mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        _check_mask_source(self.subject, self.subject_mask, self.subject_text, "subject")
        _check_mask_source(self.condition, self.region_mask, self.region_text, "region")
        if self.subject_text is not None or self.region_text is not None:
            self.localization.validate()
        if self.subject.shape != self.condition.shape:
            raise InvalidInputError(
                f"subject {tuple(self.subject.shape[2:])} and condition {tuple(self.condition.shape[2:])} images "
                "must have the same size"
            )
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)  # validates both
        check_seed(self.seed)


@dataclass(frozen=True)
class _Branches:
    """Row layout of one CFG half: which rows are references (overwritten by their inversion)."""

    references: int  # the leading rows, taken from the inverted latents in inversion order
    target: int
    condition: int | None  # the row whose queries/keys form the background in SAGI


def _layout(mode: str) -> _Branches:
    return _Branches(2, 2, 0) if mode == "edit" else _Branches(1, 1, None)


def _groups(target: int, fg: tuple[int, int], bg: tuple[int, int], masks: dict[str, torch.Tensor]) -> dict:
    """Mutual-attention inputs for one half: only the target row reads other rows (the others attend to
    themselves); its foreground group reads (queries, keys/values) of rows `fg` over subject keys, its
    background group rows `bg` over keys outside the region, blended by the region mask; made on the
    masks' device."""
    device = masks["subject"].device
    return {
        "mutual_rows": torch.tensor([target], device=device),
        "q_index": torch.tensor([[fg[0]], [bg[0]]], device=device),
        "kv_index": torch.tensor([[fg[1]], [bg[1]]], device=device),
        "self_key_masks": torch.stack([masks["subject"], 1 - masks["region"]])[:, None],
        "self_out_gates": torch.stack([masks["region"], 1 - masks["region"]])[:, None],
    }


def _check_mask_source(image: torch.Tensor, mask: torch.Tensor | None, text: str | None, name: str) -> None:
    """Exactly one of the hand-drawn mask and the text for it; the mask checked against its image."""
    image_name = "subject" if name == "subject" else "condition"
    if (mask is None) == (text is None):
        given = "both" if mask is not None else "neither"
        raise InvalidInputError(
            f"MCA-Ctrl needs the {name} as a mask (--{name}-mask) or as a text to find in the {image_name} image "
            f"(--{name}-text), not {given}: give exactly one"
        )
    if mask is not None:
        check_pair(image, mask, image_name)
    elif image.dim() != 4 or image.shape[:2] != (1, 3):
        raise InvalidInputError(f"{image_name} must be an RGB tensor [1, 3, H, W], got {tuple(image.shape)}")


def masks_from_text(composer: Composer, request: McaCtrlRequest) -> McaCtrlRequest:
    """The request with its text-given masks made by the Subject Localization Module (the subject text
    on the subject image, the region text on the condition image); as it is when both are drawn."""
    if request.subject_text is None and request.region_text is None:
        return request
    from vgrt.runtime.methods.subject_localization import open_localizer

    localizer, settings = open_localizer(composer, request.localization), request.localization
    masks = {}
    if request.subject_text is not None:
        masks["subject_mask"] = localizer.mask(request.subject, request.subject_text, settings, "--subject-text")
    if request.region_text is not None:
        masks["region_mask"] = localizer.mask(request.condition, request.region_text, settings, "--region-text")
    return replace(request, subject_text=None, region_text=None, **masks)


def compose(composer: Composer, request: McaCtrlRequest) -> Composition:
    request.validate()  # before the masks are looked for
    request = masks_from_text(composer, request)
    height, width = request.condition.shape[2:]
    run = start(composer, request, (width, height), FEATURES, COMPONENTS)
    unet, times = run.unet, run.times
    branches = _layout(request.mode)
    rows = branches.target + 1

    with times("encode"):
        references = torch.cat([request.condition, request.subject]) if request.mode == "edit" else request.subject
        clean = composer.encode_images(references)
        empty, prompt = split_rows(composer.text_conditioning(["", request.prompt], width, height))
    h, w = clean.shape[2:]
    region = request.region_mask
    if request.mode == "edit":
        region = dilate(region, REGION_DILATION)
    device = composer.device
    masks = {"subject": to_latent_grid(request.subject_mask, h, w), "region": to_latent_grid(region, h, w)}
    masks = {name: mask.to(device) for name, mask in masks.items()}

    blocks = unet.spec.input("layer_gates").shape[0]
    # The inversion has every mutual gate at 0, which is the plain UNet: run that, not the grouped attention.
    inversion_inputs = repeat_rows(empty, len(clean))
    scheduler_settings = SchedulerSettings.for_preset(composer.preset)
    with times("invert"):
        trajectory = invert(
            composer.runner("unet"), build_scheduler("ddim_inverse", scheduler_settings), clean,
            Conditioning(inversion_inputs), InversionSettings(steps=request.steps, progress=composer.progress),
        )  # fmt: skip

    text = _branch_text(empty, prompt, rows, branches.target), repeat_rows(composer.unconditional(empty), rows)
    phases = _phase_feeds(unet.spec, request, branches, rows, masks, text, blocks, device)
    if request.mode == "edit":
        first = torch.cat([trajectory[-1], trajectory[-1][:1]])
    else:
        noise = random_latents(trajectory[-1].shape, torch.Generator().manual_seed(request.seed), device=device)
        first = torch.cat([trajectory[-1], noise])

    def before_step(i, t, latents, feed):
        latents[: branches.references] = trajectory[-1 - i]
        feed.update(phases[_phase(request.mode, i)])

    def after_step(i, t, latents):
        if request.mode == "edit":  # LocalBlend: keep the condition outside the (dilated) region
            m = masks["region"]
            latents[branches.target] = (1 - m) * trajectory[-1 - i][0] + m * latents[branches.target]

    with times("denoise"):
        latents = denoise(
            unet, build_scheduler("ddim", scheduler_settings), first, Conditioning(phases["plain_cond"], phases["plain_uncond"]),
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress),
            before_step=before_step, after_step=after_step,
        )  # fmt: skip
    target = latents[branches.target : branches.target + 1]
    return Composition(decode(composer, target, times), target, times)


def _phase(mode: str, step: int) -> str:
    if step >= SAGI_END_STEP:
        return "salq"
    return "plain" if mode == "generate" and step == 0 else "sagi"


def _branch_text(empty: dict, prompt: dict, rows: int, target: int) -> dict:
    """Every branch's text inputs: the empty prompt's, but the target's own prompt on its row."""
    text = {name: value.expand(rows, *value.shape[1:]).clone() for name, value in empty.items()}
    for name, value in text.items():
        value[target] = prompt[name][0]
    return text


def _phase_feeds(spec, request, branches: _Branches, rows: int, masks, text, blocks: int, device) -> dict:
    """The UNet inputs of each phase, built (and stacked for guidance) once for the whole run, on `device`;
    `text` holds the (conditional, unconditional) text inputs of every row."""
    target = branches.target
    if request.mode == "edit":
        sagi = _groups(target, fg=(1, 1), bg=(0, 0), masks=masks)
        salq = _groups(target, fg=(target, 1), bg=(target, 0), masks=masks)
        salq_first = round(EDIT_SALQ_FIRST_BLOCK * blocks)
    else:
        sagi = _groups(target, fg=(0, 0), bg=(target, target), masks=masks)
        salq = _groups(target, fg=(target, 0), bg=(target, target), masks=masks)
        salq_first = 0
    context, uncond = text
    guided = request.guidance_scale > 1
    feeds = {}
    for name, groups, first_block in (("plain", sagi, blocks), ("sagi", sagi, 0), ("salq", salq, salq_first)):
        gates = layer_gates(blocks, device)
        gates[first_block:, MUTUAL_GATE] = 1.0  # blends mutual attention in from this block on
        cond = {**context, "layer_gates": gates, **groups}
        feeds[f"{name}_cond"], feeds[f"{name}_uncond"] = cond, uncond
        feeds[name] = unet_inputs(spec, Conditioning(cond, uncond), rows, guided, device)
    return feeds
