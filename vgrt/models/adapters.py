"""Small trained adapters that turn CLIP image features into UNet tokens.

Their weights load from safetensors (a `<adapter>/model.safetensors` in the weights folder); presets
give seeded random weights, fine for parity and speed, meaningless for images.
"""

import torch
from torch import nn

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
        self.net = nn.Sequential(nn.Linear(image_token_dim, context_dim), nn.GELU(), nn.Linear(context_dim, context_dim))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(image_tokens))
