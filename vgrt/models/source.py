"""Where a model's weights come from: a preset with seeded random weights, or a local weights path."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgrt.errors import WeightsError
from vgrt.models.weights import apply_state_dict, find_component_weights, load_state_dict

# Each component draws its random weights from its own seed, so that which components are built,
# and in which order, never changes any of them.
_SEED_OFFSETS = {
    "unet": 0, "vae": 101, "text_encoder": 202, "text_encoder_2": 303, "image_encoder": 404,
    "image_proj": 505, "fusion_mlp": 606, "appearance_net": 707, "aligner": 808,
    "layout_adapter": 909, "appearance_adapter": 1010,
}  # fmt: skip


@dataclass(frozen=True)
class ModelSource:
    """A preset's architecture with weights from `seed`, or from `weights` (a diffusers folder, or a
    .safetensors file holding the UNet alone)."""

    preset: str
    seed: int = 0
    weights: str | None = None
    allow_pickle: bool = False

    def seed_torch(self, folder: str) -> None:
        torch.manual_seed(self.seed + _SEED_OFFSETS[folder])

    def folder_config(self, folder: str) -> dict[str, Any] | None:
        """The component's config.json from the weights folder, if there is one."""
        if not self.weights:
            return None
        return find_component_weights(self._checked_path(folder), folder)[1]

    def load_into(self, module: torch.nn.Module, folder: str) -> None:
        """Load the weights of `folder` (unet, vae, text_encoder, ...) into `module`; no-op for presets."""
        if not self.weights:
            return
        weights_file, _ = find_component_weights(self._checked_path(folder), folder)
        apply_state_dict(module, load_state_dict(weights_file, self.allow_pickle), weights_file)

    def _checked_path(self, folder: str) -> Path:
        path = Path(self.weights)
        if path.is_file() and folder != "unet":
            raise WeightsError(
                f"{str(path)!r} is a single weights file, which holds the UNet only; give a diffusers folder "
                f"with a {folder}/ subfolder to load the {folder}"
            )
        return path
