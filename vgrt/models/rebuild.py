"""Rebuild the PyTorch module an exported directory was made from, and prove it is the same one."""

import torch

from vgrt.errors import ArtifactError
from vgrt.models.unet import UNetSource, build_unet
from vgrt.models.weights import state_dict_sha256

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def module_from_manifest(manifest, component: str = "unet") -> tuple[torch.nn.Module, torch.dtype]:
    entry = manifest.component(component)
    source = manifest.data["source"]
    unet_source = UNetSource(manifest.data["preset"], source["seed"], source["weights"], source["allow_pickle"])
    module = build_unet(unet_source, frozenset(entry.features))
    if state_dict_sha256(module) != source["weights_sha256"]:
        raise ArtifactError(
            f"the weights rebuilt for {str(manifest.directory)!r} differ from the exported ones "
            f"(preset {manifest.data['preset']!r}, seed {source['seed']}, weights {source['weights']!r}); "
            "the weights file or vgrt changed since export: export again"
        )
    return module, _DTYPES[manifest.data["settings"]["dtype"]]
