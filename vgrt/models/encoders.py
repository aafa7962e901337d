"""The non-UNet components as modules whose forward takes and returns named tensors only.

Each wraps a diffusers or transformers model and fixes the convention the runtime relies on: the VAE
encoder returns the scaled latent mean, the decoder takes scaled latents and returns images in
[-1, 1], the text encoder returns its last and penultimate hidden states and pooled embedding, the
CLIP image encoder returns projected embeds and penultimate-layer tokens.
"""

import torch
from diffusers import AutoencoderKL
from torch import nn


class VaeEncoder(nn.Module):
    """images [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/f, W/f], scaled by the VAE's scaling factor."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor


class VaeDecoder(nn.Module):
    """latents [B, 4, h, w] (scaled) -> images [B, 3, h*f, w*f] in about [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


class TextEncoder(nn.Module):
    """input_ids [B, 77] -> last and penultimate hidden states [B, 77, D], pooled embedding [B, P].

    SD 1.5 and 2.1 condition on the last hidden state, SDXL on the penultimate one plus the pooled
    (projected) embedding of its second encoder.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


@torch.no_grad()
def positionless_states(encoder: TextEncoder, token: int) -> dict[str, torch.Tensor]:
    """The outputs of `encoder` (named as its export's) for a full-length sequence of `token` encoded without
    position embeddings, as AIComposer's exceptional-prompt encoders (`CLIPTextInv*`) compute it.

    Every position then encodes alike (causal attention over equal tokens returns their common value, and
    the rest works per token), so one token's pass through the layers, with attention reduced to its value
    projection, gives them all; it is expanded to the sequence length."""
    model = encoder.model
    text = getattr(model, "text_model", model)  # transformers 5's CLIPTextModel is its text transformer
    device = text.embeddings.token_embedding.weight.device
    hidden = text.embeddings.token_embedding(torch.tensor([[token]], device=device))
    states = [hidden]
    for layer in text.encoder.layers:
        attention = layer.self_attn
        hidden = hidden + attention.out_proj(attention.v_proj(layer.layer_norm1(hidden)))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        states.append(hidden)
    last = text.final_layer_norm(hidden)
    pooled = model.text_projection(last[:, 0]) if hasattr(model, "text_projection") else last[:, 0]
    length = model.config.max_position_embeddings
    return {
        "last_hidden_state": last.expand(-1, length, -1),
        "penultimate_hidden_state": states[-2].expand(-1, length, -1),
        "pooled": pooled,
    }


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, S, S] (CLIP-normalized) -> projected image_embeds [B, P] and the
    penultimate layer's tokens [B, 1 + patches, D] (IP-Adapter Plus and VCF read those)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]
