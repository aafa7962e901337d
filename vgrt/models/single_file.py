"""Single-file checkpoints in the original Stable Diffusion layout, read through diffusers' own single-file loading.

One .safetensors file holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and
the text encoder(s) under `cond_stage_model.` (SDXL: `conditioner.embedders.`). diffusers converts each to
its own layout, but takes the component's config from a hub unless given one: vgrt gives it the configs of
the preset the checkpoint is of, written from vgrt's presets as a diffusers folder's config files, so
nothing is fetched. Which preset that is comes from the checkpoint's tensor shapes. A single file holds no
tokenizer: `tokenizer/` (SDXL also `tokenizer_2/`) is read from the checkpoint's folder.
"""

import json
import tempfile
from functools import cache
from pathlib import Path

import torch

from vgrt.errors import WeightsError
from vgrt.models.presets import PRESETS, Preset

UNET_PREFIX = "model.diffusion_model."
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_SDXL_ADDED = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's added (text_time) conditioning


def is_original_checkpoint(weights: str | Path | None) -> bool:
    """Whether `weights` is a .safetensors file in the original SD layout (its UNet under model.diffusion_model.)."""
    if not weights or Path(weights).suffix != ".safetensors" or not Path(weights).is_file():
        return False
    return _CONV_IN in _shapes(Path(weights))


def checkpoint_preset(path: str | Path) -> Preset:
    """The preset whose architecture the checkpoint's UNet has: its first level's width, its text context
    width and whether it takes SDXL's added conditioning, read from the tensor shapes (no weights read)."""
    shapes = _shapes(Path(path))
    context = next((shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    found = (shapes[_CONV_IN][0], context, _SDXL_ADDED in shapes)
    for preset in PRESETS.values():
        if (preset.unet["block_out_channels"][0], preset.context_dim, preset.is_sdxl) == found:
            return preset
    raise WeightsError(
        f"the single-file checkpoint {str(path)!r} matches no preset (first UNet level {found[0]} channels, text "
        f"context {found[1]}, {'with' if found[2] else 'without'} SDXL's added conditioning); vgrt reads single files "
        f"of the {', '.join(PRESETS)} architectures: for another model, use its diffusers folder as published"
    )


def load_component(path: str | Path, component: str, preset: Preset) -> dict[str, torch.Tensor]:
    """The state dict, in diffusers' naming, of one component of the checkpoint, converted by diffusers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if component not in COMPONENTS or (component == "text_encoder_2" and not preset.text_encoder_2):
        held = ", ".join(c for c in COMPONENTS if c != "text_encoder_2" or preset.text_encoder_2)
        raise WeightsError(
            f"the single-file checkpoint {str(path)!r} holds {held}, not {component}; give {component}'s weights "
            "in a diffusers folder"
        )
    configs = str(_config_folder(preset.name))
    try:
        if component in ("unet", "vae"):
            model_class = UNet2DConditionModel if component == "unet" else AutoencoderKL
            model = model_class.from_single_file(str(path), config=configs, subfolder=component, local_files_only=True)
        else:
            model = _text_encoder(path, component, configs)
    except (ValueError, KeyError, RuntimeError) as err:
        raise WeightsError(
            f"diffusers could not read the {component} of the single-file checkpoint {str(path)!r} as a {preset.name} "
            f"model ({err}); is it an original Stable Diffusion checkpoint of that architecture?"
        ) from err
    return model.state_dict()


def _text_encoder(path: str | Path, component: str, configs: str) -> torch.nn.Module:
    """The text encoder through diffusers' single-file CLIP loader (the one its pipelines' from_single_file uses)."""
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    model_class = (
        transformers.CLIPTextModelWithProjection if component == "text_encoder_2" else transformers.CLIPTextModel
    )
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    return create_diffusers_clip_model_from_ldm(
        model_class, checkpoint, subfolder=component, config=configs, local_files_only=True
    )


def _shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as file:
            return {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"cannot read weights {str(path)!r}: {err}; the file is corrupt or truncated") from err


def _config_folder(preset_name: str) -> Path:
    """The preset's component configs as a diffusers folder's config files, written once per process."""
    return Path(_written_configs(preset_name).name)


@cache
def _written_configs(preset_name: str) -> tempfile.TemporaryDirectory:
    import transformers

    preset = PRESETS[preset_name]
    written = tempfile.TemporaryDirectory(prefix=f"vgrt-{preset_name}-configs-")  # removed when the process ends
    folder = Path(written.name)
    for name, class_name, config in (
        ("unet", "UNet2DConditionModel", preset.unet),
        ("vae", "AutoencoderKL", preset.vae),
    ):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    transformers.CLIPTextConfig(**preset.text_encoder).save_pretrained(folder / "text_encoder")
    if preset.text_encoder_2:
        transformers.CLIPTextConfig(**preset.text_encoder_2).save_pretrained(folder / "text_encoder_2")
    return written
