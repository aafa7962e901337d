"""A preset's model written as a diffusers Stable Diffusion folder, with the weights vgrt builds for it.

Other tools (optimum-intel, diffusers itself) read such a folder, so a benchmark can run them on exactly
the weights vgrt runs, and tests can load real layouts without a download. The tokenizer files are
CLIP's format (vocab.json, merges.txt) holding vgrt's trained preset vocabulary, since CLIP's own
cannot be fetched: CLIP's byte alphabet, each byte at a word's end, the preset's merges, and the start
and end tokens at the ids the preset's text encoder reserves for them.
"""

import json
from pathlib import Path

from vgrt.models.source import ModelSource

START, END = "<|startoftext|>", "<|endoftext|>"


def write_diffusers_folder(
    source: ModelSource, folder: str | Path, variant: str | None = None, max_shard_size: str | None = None
) -> Path:
    """`source`'s UNet, VAE, text encoder(s), tokenizer(s) and DDIM scheduler as a StableDiffusionPipeline
    folder, or a StableDiffusionXLPipeline one for an SDXL-shaped preset, in the layout published models have.

    `variant` ('fp16') writes the weights in fp16 under the variant's file names, as published fp16 variants
    are; `max_shard_size` (e.g. '200KB') shards them with an index file, as large published models are.
    """
    import torch

    from vgrt.export.components import build_component
    from vgrt.models.unet import build_unet
    from vgrt.runtime.schedulers import SchedulerSettings, build_scheduler

    preset = source.model_preset()
    folder = Path(folder)
    models = {
        "unet": build_unet(source, frozenset()).unet,
        "vae": build_component("vae_decoder", source, frozenset(), "fp32").module.vae,
        "text_encoder": build_component("text_encoder", source, frozenset(), "fp32").module.model,
    }
    if preset.is_sdxl:
        models["text_encoder_2"] = build_component("text_encoder_2", source, frozenset(), "fp32").module.model
    options = {"variant": variant} | ({"max_shard_size": max_shard_size} if max_shard_size else {})
    for name, model in models.items():
        (model.to(torch.float16) if variant == "fp16" else model).save_pretrained(folder / name, **options)
    build_scheduler("ddim", SchedulerSettings.for_preset(preset)).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer", preset.text_encoder)
    if preset.is_sdxl:
        write_clip_tokenizer(folder / "tokenizer_2", preset.text_encoder_2)
    (folder / "model_index.json").write_text(json.dumps(_model_index(preset.is_sdxl), indent=1))
    return folder


def write_clip_tokenizer(folder: Path, text_encoder: dict) -> None:
    """vocab.json and merges.txt in CLIP's format, within the text encoder's vocabulary."""
    from vgrt.models.tokenizer import preset_bpe_merges

    start = text_encoder.get("bos_token_id", text_encoder["vocab_size"] - 2)
    end = text_encoder.get("eos_token_id", text_encoder["vocab_size"] - 1)
    alphabet = byte_alphabet()
    vocab = [*alphabet, *(symbol + "</w>" for symbol in alphabet)]
    merges = []
    for left, right in preset_bpe_merges(min(start, end) - len(vocab)):
        if left + right not in vocab and all(part in vocab for part in (left, right)):
            merges.append(f"{left} {right}")
            vocab.append(left + right)
    folder.mkdir(parents=True, exist_ok=True)
    ids = {token: index for index, token in enumerate(vocab)} | {START: start, END: end}
    (folder / "vocab.json").write_text(json.dumps(ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": text_encoder["max_position_embeddings"], "pad_token": END}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def byte_alphabet() -> list[str]:
    """CLIP's (GPT-2's) symbol for each byte 0..255: printable Latin-1 bytes stand for themselves, the
    others take the code points from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return symbols


def _model_index(sdxl: bool) -> dict:
    from diffusers import __version__

    common = {
        "_diffusers_version": __version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        return common | {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    return common | {
        "_class_name": "StableDiffusionPipeline",
        "requires_safety_checker": False,
        "safety_checker": [None, None],
    }
