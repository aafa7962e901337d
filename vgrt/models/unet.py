"""The conditioned UNet: a diffusers UNet whose forward takes only named tensors (the export contract).

Which conditioning features it carries is fixed at construction; their tensors are the optional
keyword inputs of `forward`. With no features it is the stock UNet with the stock processors.
"""

import re

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from vgrt.models.conditioning import Conditioning
from vgrt.models.presets import Preset
from vgrt.models.processors import CrossAttentionProcessor, SelfAttentionProcessor
from vgrt.models.source import ModelSource

# Adapter weights are drawn from a generator of their own so that adding a feature never changes
# the UNet's own random weights.
_ADAPTER_SEED_OFFSET = 1_000_003


def transformer_blocks(unet: UNet2DConditionModel) -> list[str]:
    """Module paths of the UNet's transformer blocks, in forward order; row i of `layer_gates` is block i."""
    names = [name.rsplit(".attn", 1)[0] for name in unet.attn_processors if name.endswith("attn1.processor")]
    return sorted(dict.fromkeys(names), key=_forward_position)


def _forward_position(module_path: str) -> tuple[int, int]:
    # Stable sort key: down blocks, then the mid block, then up blocks (module registration order differs).
    if module_path.startswith("mid_block"):
        return 1, 0
    stage, index = re.match(r"(down|up)_blocks\.(\d+)", module_path).groups()
    return (0 if stage == "down" else 2), int(index)


def downsampling_factor(module_path: str, levels: int) -> int:
    """How many times coarser than the latent the attention at `module_path` works."""
    if module_path.startswith("mid_block"):
        return 2 ** (levels - 1)
    index = int(re.match(r"(down|up)_blocks\.(\d+)", module_path).group(2))
    return 2 ** (index if module_path.startswith("down") else levels - 1 - index)


def build_processors(unet: UNet2DConditionModel, features: frozenset[str], seed: int) -> dict[str, nn.Module]:
    levels = len(unet.config.block_out_channels)
    block_of = {name: i for i, name in enumerate(transformer_blocks(unet))}
    processors: dict[str, nn.Module] = {}
    torch.manual_seed(seed + _ADAPTER_SEED_OFFSET)
    for name in unet.attn_processors:
        module_path = name.removesuffix(".processor")
        block, kind = module_path.rsplit(".", 1)
        factor = downsampling_factor(module_path, levels)
        if kind == "attn1":
            processors[name] = SelfAttentionProcessor(features, block_of[block], factor)
        else:
            attn = unet.get_submodule(module_path)
            processors[name] = CrossAttentionProcessor(
                features, block_of[block], factor, unet.config.cross_attention_dim, attn.to_k.out_features
            )
    return processors


class ConditionedUNet(nn.Module):
    """UNet + conditioning processors; `forward` is the graph that export traces."""

    def __init__(self, unet: UNet2DConditionModel, preset: Preset, features: frozenset[str], seed: int = 0):
        super().__init__()
        self.unet, self.preset, self.features = unet, preset, features
        self.num_blocks = len(transformer_blocks(unet))
        if features:
            unet.set_attn_processor(build_processors(unet, features, seed))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        extra_key_tokens: torch.Tensor | None = None,
        extra_gate: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
        token_regions: torch.Tensor | None = None,
        mutual_rows: torch.Tensor | None = None,
        q_index: torch.Tensor | None = None,
        kv_index: torch.Tensor | None = None,
        self_key_masks: torch.Tensor | None = None,
        self_out_gates: torch.Tensor | None = None,
        layer_gates: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The noise prediction; with `probes`, also the attention maps (vgrt.models.probes)."""
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.preset.is_sdxl else None
        kwargs = None
        probe_maps: list[torch.Tensor] | None = [] if "probes" in self.features else None
        if self.features:
            conditioning = Conditioning(
                key_mask, extra_tokens, extra_key_tokens, extra_gate, region_masks, token_regions,
                mutual_rows, q_index, kv_index, self_key_masks, self_out_gates, layer_gates, probe_maps,
            )  # fmt: skip
            kwargs = {"conditioning": conditioning}
        noise_pred = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        if probe_maps is None:
            return noise_pred
        return noise_pred, torch.stack(probe_maps).mean(dim=0)


def unet_config(source: ModelSource, preset: Preset) -> dict:
    """The UNet's config: the weights folder's, else the preset's."""
    folder_config = source.folder_config("unet")
    return {k: v for k, v in folder_config.items() if not k.startswith("_")} if folder_config else preset.unet


def attention_processors(unet: UNet2DConditionModel) -> nn.ModuleList:
    """The UNet's attention processors in diffusers' order, self-attention included: the list IP-Adapter
    indexes its per-layer weights by (`ip_adapter.<i>.to_k_ip.weight` is `to_k_extra` of entry i)."""
    return nn.ModuleList(unet.attn_processors.values())


def build_unet(source: ModelSource, features: frozenset[str]) -> ConditionedUNet:
    """The conditioned UNet of `source`, in eval mode, fp32, on the CPU; the extra-token projections come
    from an adapter checkpoint (IP-Adapter) when the source has one, else from the seed."""
    from vgrt.models.adapter_checkpoints import UNET, load_adapter_weights, source_adapters

    preset = source.model_preset()
    source.seed_torch("unet")
    unet = UNet2DConditionModel(**unet_config(source, preset))
    source.load_into(unet, "unet")
    conditioned = ConditionedUNet(unet, preset, features, source.seed).eval()
    if "extra_tokens" in features:
        load_adapter_weights(attention_processors(unet), UNET, source_adapters(source), source.allow_pickle)
    return conditioned
