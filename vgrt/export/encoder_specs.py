"""Export specs of the VAE, text encoder and CLIP image encoder of a preset."""

from typing import Any

from vgrt.export.spec import ComponentSpec, TensorSpec
from vgrt.models.presets import Preset, Range, vision_tokens


def _pixel_range(preset: Preset) -> Range:
    f = preset.vae_factor
    return Range(preset.profile.latent.min * f, preset.profile.latent.opt * f, preset.profile.latent.max * f)


def vae_encoder_spec(preset: Preset, config: dict[str, Any], dtype: str) -> ComponentSpec:
    f = preset.vae_factor
    pixels = _pixel_range(preset)
    return ComponentSpec(
        name="vae_encoder",
        inputs=(
            TensorSpec(
                "images", dtype, ("batch", config["in_channels"], "height", "width"), "RGB in [-1, 1]", (-1.0, 1.0)
            ),
        ),
        outputs=(
            TensorSpec(
                "latents",
                dtype,
                ("batch", config["latent_channels"], f"height/{f}", f"width/{f}"),
                "scaled latent mean",
            ),
        ),
        dims={"batch": preset.profile.batch, "height": pixels, "width": pixels},
        # pixel sizes whose latents the UNet can take
        multiple_of={"height": f * preset.latent_factor, "width": f * preset.latent_factor},
    )


def vae_decoder_spec(preset: Preset, config: dict[str, Any], dtype: str) -> ComponentSpec:
    f = preset.vae_factor
    return ComponentSpec(
        name="vae_decoder",
        inputs=(
            TensorSpec("latents", dtype, ("batch", config["latent_channels"], "height", "width"), "scaled latents"),
        ),
        outputs=(
            TensorSpec(
                "images", dtype, ("batch", config["out_channels"], f"height*{f}", f"width*{f}"), "RGB, about [-1, 1]"
            ),
        ),
        dims={"batch": preset.profile.batch, "height": preset.profile.latent, "width": preset.profile.latent},
    )


def text_encoder_spec(preset: Preset, config: dict[str, Any], dtype: str, name: str = "text_encoder") -> ComponentSpec:
    length, hidden, vocab = config["max_position_embeddings"], config["hidden_size"], config["vocab_size"]
    pooled = config.get("projection_dim", hidden) if name == "text_encoder_2" else hidden
    return ComponentSpec(
        name=name,
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", length), "token ids, padded to the full length", (0, vocab - 1)),
        ),
        outputs=(
            TensorSpec("last_hidden_state", dtype, ("batch", length, hidden)),
            TensorSpec("penultimate_hidden_state", dtype, ("batch", length, hidden)),
            TensorSpec("pooled", dtype, ("batch", pooled), "pooled (projected for SDXL's second encoder) embedding"),
        ),
        dims={"batch": preset.profile.batch},
    )


def image_encoder_spec(preset: Preset, config: dict[str, Any], dtype: str) -> ComponentSpec:
    size, hidden = config["image_size"], config["hidden_size"]
    return ComponentSpec(
        name="image_encoder",
        inputs=(TensorSpec("pixel_values", dtype, ("batch", 3, size, size), "CLIP-normalized RGB"),),
        outputs=(
            TensorSpec("image_embeds", dtype, ("batch", config["projection_dim"]), "projected embedding"),
            TensorSpec(
                "penultimate_tokens", dtype, ("batch", vision_tokens(config), hidden), "penultimate layer tokens"
            ),
        ),
        dims={"batch": preset.profile.batch},
    )


def image_proj_spec(preset: Preset, image_embed_dim: int, tokens: int, dtype: str) -> ComponentSpec:
    return ComponentSpec(
        name="image_proj",
        inputs=(TensorSpec("image_embeds", dtype, ("batch", image_embed_dim), "CLIP image embeds"),),
        outputs=(TensorSpec("ip_tokens", dtype, ("batch", tokens, preset.context_dim), "IP-Adapter tokens"),),
        dims={"batch": preset.profile.batch},
    )


def fusion_mlp_spec(preset: Preset, tokens: int, dtype: str) -> ComponentSpec:
    shape = ("batch", tokens, preset.context_dim)
    return ComponentSpec(
        name="fusion_mlp",
        inputs=(
            TensorSpec("content", dtype, shape, "foreground IP tokens"),
            TensorSpec("style", dtype, shape, "background IP tokens"),
        ),
        outputs=(TensorSpec("fused", dtype, shape, "content + style - mlp(content, style)"),),
        dims={"batch": preset.profile.batch},
    )


def appearance_net_spec(preset: Preset, image_token_dim: int, dtype: str) -> ComponentSpec:
    return ComponentSpec(
        name="appearance_net",
        inputs=(TensorSpec("image_tokens", dtype, ("batch", "tokens", image_token_dim), "CLIP image tokens"),),
        outputs=(TensorSpec("appearance_tokens", dtype, ("batch", "tokens", preset.context_dim)),),
        dims={"batch": preset.profile.batch, "tokens": preset.profile.extra_tokens},
    )


def aligner_spec(preset: Preset, image_token_dim: int, image_tokens: int, dtype: str) -> ComponentSpec:
    """VCF's aligner: any selection of one image's penultimate tokens (1 to all `image_tokens` of them)."""
    return ComponentSpec(
        name="aligner",
        inputs=(TensorSpec("image_tokens", dtype, ("batch", "tokens", image_token_dim), "CLIP penultimate tokens"),),
        outputs=(TensorSpec("aligned_tokens", dtype, ("batch", "tokens", preset.context_dim), "in text space"),),
        dims={"batch": preset.profile.batch, "tokens": Range(1, image_tokens, image_tokens)},
    )


def layout_adapter_spec(preset: Preset, image_embed_dim: int, tokens: int, dtype: str) -> ComponentSpec:
    """Object-level visual prompts' key source: one object's global CLIP embedding -> its key tokens."""
    return ComponentSpec(
        name="layout_adapter",
        inputs=(TensorSpec("image_embeds", dtype, ("batch", image_embed_dim), "CLIP image embeds, one per object"),),
        outputs=(TensorSpec("layout_tokens", dtype, ("batch", tokens, preset.context_dim), "key tokens (coarse)"),),
        dims={"batch": preset.profile.batch},
    )


def appearance_adapter_spec(preset: Preset, token_dim: int, grid: int, tokens: int, dtype: str) -> ComponentSpec:
    """Object-level visual prompts' value source: one object's CLIP grid tokens -> its value tokens."""
    return ComponentSpec(
        name="appearance_adapter",
        inputs=(TensorSpec("image_tokens", dtype, ("batch", grid, token_dim), "CLIP penultimate-layer tokens"),),
        outputs=(TensorSpec("appearance_tokens", dtype, ("batch", tokens, preset.context_dim), "value tokens (fine)"),),
        dims={"batch": preset.profile.batch},
    )
