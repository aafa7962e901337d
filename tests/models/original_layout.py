"""Diffusers state dicts written back in the original Stable Diffusion single-file layout, for the tests of
single-file loading (no such checkpoint can be downloaded here). SD 1.x-shaped models (UNet, VAE, CLIP text
encoder) only; the tests check the result by diffusers' own conversion, which must give the weights back."""

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict in the original layout: model.diffusion_model., first_stage_model., cond_stage_model."""
    layers, attends = unet.config.layers_per_block, ["CrossAttn" in t for t in unet.config.up_block_types]
    state = {"model.diffusion_model." + _unet_key(k, layers, attends): v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        original, is_attention = _vae_key(key, levels)
        if is_attention and value.dim() == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        state["first_stage_model." + original] = value
    for key, value in text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return {k: v.contiguous() for k, v in state.items()}


def _unet_key(key: str, layers: int, up_attends: list[bool]) -> str:
    """The original name of a UNet key; `up_attends` says which up blocks have attention (their upsampler
    comes after it in the original's block)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for diffusers, original in fixed.items():
        if key.startswith(diffusers + "."):
            return original + key[len(diffusers) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * (layers + 1) + index + 1
        return f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = int(m[1]) * (layers + 1) + int(m[3])
        return f"output_blocks.{block}.{0 if m[2] == 'resnets' else 1}.{_resnet(m[4]) if m[2] == 'resnets' else m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        return f"output_blocks.{level * (layers + 1) + layers}.{2 if up_attends[level] else 1}.conv.{m[2]}"
    raise KeyError(f"no original name for {key}")


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    half, _, rest = key.partition(".")
    if half not in ("encoder", "decoder"):
        return key, False  # quant_conv, post_quant_conv
    rest = rest.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest):
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        if m[3] == "resnets":
            tail = m[5].replace("conv_shortcut", "nin_shortcut")
            return f"{half}.{m[1]}.{level}.block.{m[4]}.{tail}", False
        return f"{half}.{m[1]}.{level}.{'downsample' if m[1] == 'down' else 'upsample'}.{m[5]}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{half}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
        return f"{half}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}", True
    return f"{half}.{rest}", False
