"""Visual Concept Fusion (VCF, arXiv 2605.25191): a prompt plus a reference image's CLIP tokens,
aligned into the text-embedding space, condition a frozen SD 2.1 (v-prediction, DDIM); optionally
refined by Prompt-Noise Optimization (vgrt.runtime.methods.pno).

Follows the released code (thijmennijdam/stable-diffusion-v2, `ldm/models/diffusion/ddpm.py`,
`ldm/modules/vcf/aligner.py`, `ldm/models/diffusion/ddim.py`):
- Image tokens: the CLIP image encoder's penultimate-layer tokens of the reference (all of them, the
  patches only, or the class token only: the code's `fusion_token_type` all / except_cls / cls_only),
  through the aligner (LayerNorm, Linear, ReLU, Linear; the `aligner` component).
- Fusion: `concat` (the paper's main variant) appends the aligned tokens to the 77 text tokens, so the
  UNet takes a longer context (77 + N, a dynamic dim of the exported profile); `blend` mixes their
  mean into every text token, `(1 - alpha) * text + alpha * mean(image)`; `xattn` is the code's
  CrossAttentionFusion, which has no trained weights (see `cross_attention_fusion`).
- Guidance: the unconditional context is the empty prompt's, padded with zero tokens to the
  conditional length (the code's DDIM sampler does this; no key mask, see `pad_with_zero_tokens`).
- Schedule: the preset's prediction type (v-prediction for sd21) with SD's DDIM, eta 0; the code's
  defaults are 50 steps and guidance 9.

Not on SDXL (refused before any work, `check_preset`): the aligner maps image tokens into one text
encoder's token space (the released one SD 2.1's), and the code, an SD 2 `ldm` codebase, has no SDXL;
SDXL's context is two encoders' spaces side by side plus a pooled embedding the fused image would not
reach, and no aligner is released for it.

Where this differs: the code's blend averages all tokens whatever `fusion_token_type` says, and its
optional norm matching of blended image features (`amplify_image_features`) and image-first order
(`ref_first`) are not offered; here the token selection applies to every fusion mode.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgrt.checks import check_seed
from vgrt.errors import InvalidInputError
from vgrt.models.presets import Preset, Range
from vgrt.runtime.composer import Composer
from vgrt.runtime.conditioning import Conditioning
from vgrt.runtime.gradient_precision import check_gradient_precision
from vgrt.runtime.methods.common import Composition, clip_pixels, decode, start
from vgrt.runtime.methods.pno import PnoModels, PnoObjective, PnoResult, PnoSettings, optimize
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

FUSIONS = ("concat", "blend", "xattn")
COMPONENTS = ("text_encoder", "image_encoder", "aligner", "vae_decoder")  # besides the UNet
TOKENS = ("all", "patches", "cls")  # the code's fusion_token_type: all, except_cls, cls_only


@dataclass(frozen=True)
class VcfRequest:
    """A prompt and a reference image [1, 3, h, w] in [-1, 1] (any size; CLIP resizes it).

    Args:
        width, height: output size in pixels.
        fusion: 'concat', 'blend' or 'xattn'.
        alpha: the image's weight in 'blend' and 'xattn' (the code's default 0.1); unused by 'concat'.
        tokens: which penultimate tokens are fused: 'all', 'patches' (no class token) or 'cls'.
        pno: Prompt-Noise Optimization settings; None samples the fused context as it is.
    """

    prompt: str
    reference: torch.Tensor
    width: int
    height: int
    fusion: str = "concat"
    alpha: float = 0.1
    tokens: str = "all"
    steps: int = 50
    guidance_scale: float = 9.0
    seed: int = 0
    pno: PnoSettings | None = None

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise InvalidInputError(f"unknown VCF fusion {self.fusion!r}; choose one of: {', '.join(FUSIONS)}")
        if self.tokens not in TOKENS:
            raise InvalidInputError(f"unknown VCF token selection {self.tokens!r}; choose one of: {', '.join(TOKENS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"alpha must lie in [0, 1] (the image's weight), got {self.alpha}")
        image = self.reference
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidInputError(f"the reference must be an RGB image tensor [1, 3, H, W] in [-1, 1], got {shape}")
        if not torch.isfinite(image).all():
            raise InvalidInputError("the reference image has NaN or infinite pixels")
        SamplingSettings(steps=self.steps, guidance_scale=self.guidance_scale)  # validates both
        check_seed(self.seed)


@dataclass
class VcfComposition(Composition):
    """The image, with PNO's record when it ran; `times` has the stages encode, pno, denoise, decode."""

    pno: PnoResult | None = None

    def backend_seconds(self) -> dict[str, float]:
        """Seconds in PyTorch (PNO's gradient steps) and in the engine backend (encoders, aligner,
        denoising, decoding; host-side glue included)."""
        stages = self.times.seconds
        return {"pytorch": stages.get("pno", 0.0), "engine": sum(s for name, s in stages.items() if name != "pno")}


def check_preset(preset: Preset) -> None:
    """Refuse SDXL presets (see the module's docstring), before any image is read or engine runs."""
    if preset.is_sdxl:
        raise InvalidInputError(
            f"VCF does not run on SDXL ({preset.name!r}): its aligner maps image tokens into one text encoder's "
            "space (SD 2.1's in the released code), while SDXL conditions on two encoders plus a pooled embedding; "
            "use an SD 2.1 or SD 1.x preset"
        )


def _check_supported(composer: Composer, request: VcfRequest) -> None:
    """What the preset and the device must support, before any engine runs."""
    check_preset(composer.preset)
    if request.pno is not None:
        check_gradient_precision(request.pno.precision, composer.device)


def select_tokens(tokens: torch.Tensor, which: str) -> torch.Tensor:
    """Penultimate tokens [B, 1 + P, D] (class token first) -> the fused selection."""
    return {"all": tokens, "patches": tokens[:, 1:], "cls": tokens[:, :1]}[which]


def cross_attention_fusion(text: torch.Tensor, image: torch.Tensor, alpha: float) -> torch.Tensor:
    """The code's CrossAttentionFusion (ddpm.py), [B, T, D] x [B, N, D] -> [B, T, D]; it has no trained
    weights (alpha is its only parameter, used at its initial value). Text tokens attend to the image
    tokens by cosine similarity / sqrt(D); the values are the image tokens rescaled to the text tokens'
    mean norm; the result is `(1 - alpha) * text + alpha * attended`. The sqrt(D) keeps the scores within
    +-1/sqrt(D), so the attention is close to uniform: the code's choice, kept."""
    target_norm = text.norm(dim=-1).mean()
    keys = F.normalize(image, dim=-1)
    scores = F.normalize(text, dim=-1) @ keys.transpose(-2, -1) / math.sqrt(text.shape[-1])
    attended = scores.softmax(dim=-1) @ (keys * target_norm)
    return (1 - alpha) * text + alpha * attended


def fuse(text: torch.Tensor, image: torch.Tensor, fusion: str, alpha: float) -> torch.Tensor:
    """Text tokens [B, T, D] and aligned image tokens [B, N, D] -> the conditional context."""
    if fusion == "concat":
        return torch.cat([text, image], dim=1)
    if fusion == "blend":
        return (1 - alpha) * text + alpha * image.mean(dim=1, keepdim=True)
    if fusion == "xattn":
        return cross_attention_fusion(text, image, alpha)
    raise InvalidInputError(f"unknown VCF fusion {fusion!r}; choose one of: {', '.join(FUSIONS)}")


def pad_with_zero_tokens(context: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, D] -> [B, length, D] with zero tokens appended, as the code pads the shorter guidance context.

    The UNet's K/V projections have no bias, so a zero token has key 0 and value 0: logit 0 for every
    query. It takes softmax mass and returns nothing, diluting the attention output; a key mask would
    not, so this is not the same as masking the padding and must stay zeros to match VCF.
    """
    if length < context.shape[1]:
        raise InvalidInputError(f"cannot pad a context of {context.shape[1]} tokens to {length}")
    return F.pad(context, (0, 0, 0, length - context.shape[1]))


def fused_length(request: VcfRequest, text_tokens: int, image_tokens: int) -> int:
    """Tokens of the conditional context: text plus the selected image tokens for 'concat'."""
    if request.fusion != "concat":
        return text_tokens
    return text_tokens + {"all": image_tokens, "patches": image_tokens - 1, "cls": 1}[request.tokens]


def check_context_fits(length: int, context: Range) -> None:
    """Refuse a fused context the exported UNet profile cannot take, before any engine runs."""
    if not context.min <= length <= context.max:
        raise InvalidInputError(
            f"the fused context has {length} tokens but the exported UNet takes {context.min} to {context.max}; "
            "fuse fewer image tokens (tokens 'cls' or 'patches'), use 'blend' or 'xattn' fusion, or a preset whose "
            "profile context range covers it"
        )


def aligned_tokens(composer: Composer, reference: torch.Tensor, tokens: str) -> torch.Tensor:
    """The reference's selected penultimate CLIP tokens in the text-embedding space [1, N, D]."""
    pixels = clip_pixels(reference, composer.runner("image_encoder").spec.input("pixel_values").shape[-1])
    penultimate = composer.infer("image_encoder", pixel_values=pixels)["penultimate_tokens"]
    return composer.infer("aligner", image_tokens=select_tokens(penultimate, tokens))["aligned_tokens"]


def encode(composer: Composer, request: VcfRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) contexts [1, L, D]: the fused one, and the empty prompt's padded to L."""
    empty, prompt = composer.encode_prompts(["", request.prompt]).split(1)
    cond = fuse(prompt, aligned_tokens(composer, request.reference, request.tokens), request.fusion, request.alpha)
    return cond, pad_with_zero_tokens(empty, cond.shape[1])


def compose(composer: Composer, request: VcfRequest) -> VcfComposition:
    run = start(
        composer,
        request,
        (request.width, request.height),
        "none",
        COMPONENTS,
        check=lambda: _check_supported(composer, request),
    )
    unet, times = run.unet, run.times
    text_tokens = composer.runner("text_encoder").spec.input("input_ids").shape[1]
    outputs = composer.runner("image_encoder").spec.outputs
    image_tokens = next(t for t in outputs if t.name == "penultimate_tokens").shape[1]
    check_context_fits(fused_length(request, text_tokens, image_tokens), unet.spec.dims["context"])
    models = PnoModels.from_composer(composer) if request.pno is not None else None  # built before the timers
    scheduler = SchedulerSettings.for_preset(composer.preset)
    with times("encode"):
        cond, uncond = encode(composer, request)
    noise = random_latents((1, 4, *run.latent_hw), torch.Generator().manual_seed(request.seed), composer.device)
    result = None
    if request.pno is not None:
        with times("pno"):
            objective = PnoObjective(
                models, scheduler, request.reference, uncond, request.steps, request.guidance_scale, request.pno
            )
            result = optimize(objective, cond, noise, request.pno, composer.progress)
        cond, noise = result.context, result.noise
    with times("denoise"):
        latents = denoise(
            unet, build_scheduler("ddim", scheduler), noise,
            Conditioning({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}),
            SamplingSettings(steps=request.steps, guidance_scale=request.guidance_scale, progress=composer.progress),
        )  # fmt: skip
    return VcfComposition(decode(composer, latents, times), latents, times, result)
