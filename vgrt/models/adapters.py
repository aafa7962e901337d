"""Small trained adapters that turn CLIP image features into UNet tokens.

Their weights load from the checkpoints their authors publish (vgrt.models.adapter_checkpoints), or from
safetensors in vgrt's names (a `<adapter>/model.safetensors` in the weights folder); presets give seeded
random weights, fine for parity and speed, meaningless for images.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgrt.errors import InvalidInputError

IP_TOKENS = 4  # tokens per image of IP-Adapter (SD 1.5 and SDXL base adapters)


class ImageProjection(nn.Module):
    """IP-Adapter's image projection: CLIP image embeds [B, P] -> tokens [B, IP_TOKENS, C]
    (Linear to IP_TOKENS * C, then LayerNorm over C), as diffusers' ImageProjection does."""

    def __init__(self, image_embed_dim: int, context_dim: int, num_tokens: int = IP_TOKENS):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).unflatten(-1, (self.num_tokens, -1)))


class FusionMLP(nn.Module):
    """AIComposer's CLIP feature fusion (code: `MLPCLIPFeatureNetwork`, demo.py).

    content and style are IP-projected tokens [B, T, C] (T = cond and uncond tokens, 8 in the code); the
    MLP reads both flattened and the result is `content + style - mlp(content, style)`. The code, not
    the paper, defines this form; the paper describes the fusion only in words.
    """

    def __init__(self, tokens: int, context_dim: int, hidden: int = 512):
        super().__init__()
        width = tokens * context_dim
        self.mlp = nn.Sequential(
            nn.Linear(2 * width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
        )

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([content, style], dim=-1).flatten(1)  # per token: content then style features
        return content + style - self.mlp(joint).view_as(content)


class AppearanceNet(nn.Module):
    """LocRef-Diffusion's Appearance-Net: CLIP image tokens [B, T, D] -> appearance tokens [B, T, C].

    LocRef has no released code; the paper describes two linear layers and a normalization, which is
    what this is (GELU between the layers is our choice).
    """

    def __init__(self, image_token_dim: int, context_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(image_token_dim, context_dim), nn.GELU(), nn.Linear(context_dim, context_dim)
        )
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(image_tokens))


class ImageToTextAligner(nn.Module):
    """VCF's aligner (code: `ImageToTextAlignerV1`, ldm/modules/vcf/aligner.py): CLIP image tokens [B, N, D]
    -> tokens in the text-embedding space [B, N, C], by LayerNorm(D), Linear(D, C), ReLU, Linear(C, C)
    (1280 -> 1024 -> 1024 for SD 2.1). The module layout and parameter names (`proj.0`, `proj.1`,
    `proj.3`) are the code's, so its trained state dict, saved as safetensors, loads unchanged."""

    def __init__(self, image_token_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_token_dim),
            nn.Linear(image_token_dim, context_dim),
            nn.ReLU(),
            nn.Linear(context_dim, context_dim),
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(image_tokens)


OBJECT_TOKENS = 8  # key and value tokens per object of the object-level visual prompts (our choice)


class PerceiverResampler(nn.Module):
    """Appearance adapter of object-level visual prompts (the paper's "Perceiver adapter on CLIP grid
    features"): `num_tokens` learned latent queries read CLIP penultimate tokens [B, N, D] through
    `depth` layers and become value tokens [B, num_tokens, C].

    Each layer: the latents attend (pre-norm, residual) to the image tokens and to themselves, then
    pass a GELU feed-forward (pre-norm, residual), the Perceiver form IP-Adapter Plus also uses. Width
    and head count are our choices (the paper's are unknown): width C, heads of 64 channels.
    """

    def __init__(self, image_token_dim: int, context_dim: int, num_tokens: int = OBJECT_TOKENS, depth: int = 2):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, context_dim) * context_dim**-0.5)
        self.proj_in = nn.Linear(image_token_dim, context_dim)
        self.layers = nn.ModuleList(_ResamplerLayer(context_dim, max(1, context_dim // 64)) for _ in range(depth))
        self.proj_out = nn.Linear(context_dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        inputs = self.proj_in(image_tokens)
        latents = self.latents.expand(inputs.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(inputs, latents)
        return self.norm_out(self.proj_out(latents))


class _ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_inputs, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        hidden = ff_mult * width
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False)
        )

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        context = torch.cat([self.norm_inputs(inputs), normed], dim=1)
        q = self.to_q(normed).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_kv(context).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        latents = latents + self.to_out(attended)
        return latents + self.feed_forward(latents)


def build_adapter(name: str, context_dim: int, image: dict[str, Any]) -> nn.Module:
    """The module of adapter component `name` (random weights) for a UNet of `context_dim` and a CLIP
    image tower of config `image`."""
    if name == "image_proj":
        return ImageProjection(image["projection_dim"], context_dim)
    if name == "fusion_mlp":
        return FusionMLP(2 * IP_TOKENS, context_dim)  # cond and uncond tokens, fused together as in the code
    if name == "layout_adapter":  # the paper's linear adapter on the global embedding: IP-Adapter's projection form
        return ImageProjection(image["projection_dim"], context_dim, OBJECT_TOKENS)
    if name == "appearance_adapter":
        return PerceiverResampler(image["hidden_size"], context_dim)
    if name == "aligner":
        return ImageToTextAligner(image["hidden_size"], context_dim)
    if name == "appearance_net":
        return AppearanceNet(image["hidden_size"], context_dim)
    raise InvalidInputError(f"no adapter called {name!r}")
