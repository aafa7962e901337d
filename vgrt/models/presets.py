"""Model presets: the real Stable Diffusion architectures, and tiny ones for tests (tiny: SD 1.x-shaped,
tiny-sdxl: SDXL-shaped).

A preset names the configs of every component (UNet, VAE, text encoder, CLIP image encoder) in the
argument names of the diffusers and transformers classes that build them, and the shape ranges an
exported engine must accept. Weights are seeded random unless a local weights path is given; random
weights are good for parity and speed work only, never for judging image quality.
"""

from dataclasses import dataclass, field
from typing import Any

from vgrt.errors import InvalidInputError


@dataclass(frozen=True)
class Range:
    """An inclusive (min, opt, max) range of one dynamic dimension, as TensorRT profiles take it."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InvalidInputError(f"range needs 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class ShapeProfile:
    """Ranges of the dynamic dimensions every exported UNet of a preset accepts.

    Args:
        batch: rows per UNet call, classifier-free-guidance copies and method branches included.
        latent: latent height and width (each); multiples of the UNet's downsampling factor.
        context: text (plus fused image) tokens in `encoder_hidden_states`.
        extra_tokens: tokens in each extra token set (IP-style image tokens, object tokens).
        regions: regions of the region-restriction feature.
        groups: softmax groups of the mutual self-attention feature.
        mutual_rows: rows whose self-attention reads other rows (mutual feature); distinct batch rows, so
            at most batch.max.
    """

    batch: Range
    latent: Range
    context: Range
    extra_tokens: Range = Range(1, 4, 64)
    regions: Range = Range(1, 2, 8)
    groups: Range = Range(1, 2, 4)
    mutual_rows: Range = Range(1, 1, 8)


@dataclass(frozen=True)
class Preset:
    """Configs of one model family, and the shape ranges its engines accept."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    prediction_type: str
    profile: ShapeProfile
    text_encoder_2: dict[str, Any] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # SDXL pipelines' model_index.json setting: with no negative prompt, the unconditional half of guidance
    # is zeros (text context and pooled embedding) rather than the empty prompt's encoding.
    force_zeros_for_empty_prompt: bool = False

    @property
    def latent_factor(self) -> int:
        """Latent height and width must be multiples of this (the UNet downsamples len(blocks)-1 times)."""
        return 2 ** (len(self.unet["block_out_channels"]) - 1)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def is_sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"


def pooled_text_dim(unet: dict[str, Any]) -> int:
    """Width of the pooled text embedding (`text_embeds`) an SDXL UNet with this config takes: what its
    added-condition projection reads besides the six embedded `time_ids`."""
    return int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])


def vision_tokens(config: dict[str, Any]) -> int:
    """Tokens in each layer of a CLIP vision tower with this config: the class token and one per patch."""
    return 1 + (config["image_size"] // config["patch_size"]) ** 2


def _sd_vae(scaling_factor: float, sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, act: str, **more: Any) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": 77,
        "hidden_act": act,
        **more,
    }


# OpenCLIP ViT-H/14 vision tower: the image encoder of IP-Adapter and of VCF's aligner (1280-d tokens).
_VIT_H_IMAGE = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "intermediate_size": 5120,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}

# OpenCLIP ViT-bigG/14 vision tower: the image encoder of IP-Adapter SDXL (`sdxl_models/image_encoder`, 1280-d
# embeds), which AIComposer's released code projects into its image tokens.
_VIT_BIGG_IMAGE = {
    "hidden_size": 1664,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "intermediate_size": 8192,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

_TINY_IMAGE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "hidden_act": "gelu",
}

_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

_TINY_TOKENS = {"vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 999}
_TINY_PROFILE = ShapeProfile(batch=Range(1, 2, 8), latent=Range(8, 16, 32), context=Range(1, 77, 334))

_SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="two-level UNet with 32/64 channels for tests: exports in seconds",
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        vae=_TINY_VAE,
        text_encoder=_clip_text(32, 2, 2, 64, "quick_gelu", **_TINY_TOKENS),
        image_encoder=_TINY_IMAGE,
        prediction_type="epsilon",
        profile=_TINY_PROFILE,
    ),
    "sd15": Preset(
        name="sd15",
        description="Stable Diffusion 1.5 (epsilon prediction, 768-d CLIP ViT-L text context)",
        unet=_SD15_UNET,
        vae=_sd_vae(0.18215, 512),
        text_encoder=_clip_text(768, 12, 12, 3072, "quick_gelu"),
        image_encoder=_VIT_H_IMAGE,
        prediction_type="epsilon",
        profile=ShapeProfile(batch=Range(1, 2, 8), latent=Range(32, 64, 128), context=Range(77, 77, 154)),
    ),
    "sd21": Preset(
        name="sd21",
        description="Stable Diffusion 2.1 (v-prediction, 1024-d OpenCLIP ViT-H text context)",
        unet={
            **_SD15_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        vae=_sd_vae(0.18215, 768),
        text_encoder=_clip_text(1024, 23, 16, 4096, "gelu"),
        image_encoder=_VIT_H_IMAGE,
        prediction_type="v_prediction",
        # VCF concatenates up to 257 ViT-H image tokens to the 77 text tokens.
        profile=ShapeProfile(batch=Range(1, 2, 8), latent=Range(32, 96, 128), context=Range(77, 77, 334)),
    ),
    "sdxl": Preset(
        name="sdxl",
        description="Stable Diffusion XL base (text_embeds and time_ids added conditioning, 2048-d context)",
        unet={
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        },
        vae=_sd_vae(0.13025, 1024),
        text_encoder=_clip_text(768, 12, 12, 3072, "quick_gelu"),
        text_encoder_2=_clip_text(1280, 32, 20, 5120, "gelu", projection_dim=1280),
        image_encoder=_VIT_BIGG_IMAGE,
        prediction_type="epsilon",
        profile=ShapeProfile(batch=Range(1, 2, 8), latent=Range(64, 128, 160), context=Range(77, 77, 154)),
        force_zeros_for_empty_prompt=True,
    ),
    "tiny-sdxl": Preset(
        name="tiny-sdxl",
        description="SDXL-shaped tiny model for tests: two text encoders (the second projected), text_time added "
        "conditioning, a first level without attention; every width differs so a mixed-up one shows",
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 80,  # 32 + 48: both encoders' penultimate states, concatenated
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 88,  # pooled 40 + 6 time ids x 8
            "norm_num_groups": 8,
        },
        vae=_TINY_VAE,
        text_encoder=_clip_text(32, 2, 2, 64, "quick_gelu", **_TINY_TOKENS),
        text_encoder_2=_clip_text(48, 2, 2, 96, "gelu", projection_dim=40, **_TINY_TOKENS),
        image_encoder=_TINY_IMAGE,
        prediction_type="epsilon",
        profile=_TINY_PROFILE,
        force_zeros_for_empty_prompt=True,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name raises an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
