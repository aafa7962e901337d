"""Where a model's weights come from: a preset with seeded random weights, or a local weights path.

A folder in the published diffusers layout (it holds model_index.json) names its own preset: the one its
configs match, or a preset derived from them (vgrt.models.folder_preset), so no preset needs giving; so
does a single-file checkpoint, from its tensor shapes (vgrt.models.single_file).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgrt.errors import InvalidInputError, WeightsError
from vgrt.models.folder_preset import CUSTOM, folder_preset, is_published_folder
from vgrt.models.presets import PRESETS, Preset, get_preset
from vgrt.models.single_file import checkpoint_preset, is_original_checkpoint, load_component
from vgrt.models.weights import apply_state_dict, find_component_weights, load_state_dicts

# Each component draws its random weights from its own seed, so that which components are built,
# and in which order, never changes any of them.
_SEED_OFFSETS = {
    "unet": 0, "vae": 101, "text_encoder": 202, "text_encoder_2": 303, "image_encoder": 404,
    "image_proj": 505, "fusion_mlp": 606, "appearance_net": 707, "aligner": 808,
    "layout_adapter": 909, "appearance_adapter": 1010,
}  # fmt: skip
# transformers configs record the dtype a model was saved in; given back, they would build it in that dtype
_SAVED_DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass(frozen=True)
class ModelSource:
    """A preset's architecture with weights from `seed`, or from `weights`: a diffusers folder, an
    original-SD single-file checkpoint (vgrt.models.single_file), or a .safetensors file holding the UNet
    alone in diffusers' naming.

    `preset` may be left out (None) for a published diffusers folder or a single-file checkpoint: it is read
    from the folder's configs or the checkpoint's shapes; given, it must be theirs. Folders without
    model_index.json (one component's weights, adapters) and UNet-only files are read with the preset given.
    """

    preset: str | None = None
    seed: int = 0
    weights: str | None = None
    allow_pickle: bool = False
    adapters: tuple[str, ...] = ()  # adapter checkpoints as published (vgrt.models.adapter_checkpoints)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))  # a manifest gives a list
        if self.weights and (self.preset is None or self._names_its_preset()):
            found = self._weights_preset()
            if self.preset not in (None, found.name):
                raise WeightsError(_preset_mismatch(self.preset, found.name, self.weights))
            object.__setattr__(self, "preset", found.name)  # resolved once, so sources compare by the name
        elif self.preset is None:
            raise InvalidInputError(
                "no preset and no weights folder given; name a preset (tiny, sd15, sd21, sdxl) or give a diffusers "
                "folder in the published layout"
            )

    @classmethod
    def from_options(cls, preset: str | None, weights: str | None) -> "ModelSource":
        """The source of the --preset and --weights options: the weights folder's own preset when no preset
        is given, the tiny preset when neither is."""
        return cls(preset or (None if weights else "tiny"), weights=weights)

    def model_preset(self) -> Preset:
        """The Preset of this source: the weights folder's (read from its configs) or single-file checkpoint's
        (read from its tensor shapes), else the named one."""
        if self._names_its_preset():
            return self._weights_preset()
        if self.preset == CUSTOM:
            raise WeightsError(
                f"preset {CUSTOM!r} is derived from the configs of its weights folder {self.weights!r}, which is not "
                "there (or lacks model_index.json); give the folder back, with at least its config files"
            )
        return get_preset(self.preset)

    def _names_its_preset(self) -> bool:
        return is_published_folder(self.weights) or is_original_checkpoint(self.weights)

    def _weights_preset(self) -> Preset:
        path = Path(self.weights)
        if not path.exists():
            raise WeightsError(f"weights path {str(path)!r} does not exist; give a local diffusers folder as published")
        if is_original_checkpoint(path):
            return checkpoint_preset(path)
        if path.is_file():
            raise WeightsError(
                f"{str(path)!r} is a single weights file, which holds the UNet alone and names no preset; "
                "give the preset it is of (tiny, sd15, sd21, sdxl), or a diffusers folder"
            )
        return folder_preset(path)

    def seed_torch(self, folder: str) -> None:
        torch.manual_seed(self.seed + _SEED_OFFSETS[folder])

    def folder_config(self, folder: str) -> dict[str, Any] | None:
        """The component's config.json from the weights folder, if there is one, less the dtype the weights
        were saved in (an fp16 variant's): vgrt builds every module in fp32."""
        if not self.weights:
            return None
        config = find_component_weights(self._checked_path(folder), folder)[1]
        return config and {k: v for k, v in config.items() if k not in _SAVED_DTYPE_KEYS}

    def load_into(self, module: torch.nn.Module, folder: str) -> None:
        """Load the weights of `folder` (unet, vae, text_encoder, ...) into `module`; no-op for presets."""
        if not self.weights:
            return
        if is_original_checkpoint(self.weights):
            state = load_component(self.weights, folder, self.model_preset())
            apply_state_dict(module, state, Path(self.weights))
            return
        files, _ = find_component_weights(self._checked_path(folder), folder)
        apply_state_dict(
            module, load_state_dicts(files, self.allow_pickle), files[0] if len(files) == 1 else files[0].parent
        )

    def _checked_path(self, folder: str) -> Path:
        path = Path(self.weights)
        if path.is_file() and folder != "unet" and not is_original_checkpoint(path):
            raise WeightsError(
                f"{str(path)!r} is a single weights file, which holds the UNet only; give a diffusers folder "
                f"with a {folder}/ subfolder to load the {folder}"
            )
        return path


def _preset_mismatch(given: str, found: str, folder: str) -> str:
    from vgrt.models.folder_preset import preset_differences

    if given in PRESETS and Path(folder).is_dir():
        differences = preset_differences(get_preset(given), folder)[:3]
        why = f" ({'; '.join(differences)})" if differences else ""
    else:
        why = f" ({given!r} is no preset: {', '.join(PRESETS)})"
    return (
        f"preset {given!r} was given, but the configs in {folder!r} are those of {found!r}{why}; "
        "leave the preset out, and it is read from the weights"
    )
