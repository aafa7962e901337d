"""Rebuild the PyTorch module an exported component was made from, and prove it is the same one."""

import torch

from vgrt.errors import ArtifactError
from vgrt.models.source import ModelSource
from vgrt.models.weights import model_sha256

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def module_from_manifest(manifest, component: str = "unet") -> tuple[torch.nn.Module, torch.dtype]:
    """(module, dtype) of `component` of an exported directory; raises if the weights changed since export."""
    from vgrt.export.components import build_component

    entry = manifest.component(component)
    source = manifest.data["source"]
    model_source = ModelSource(
        manifest.data["preset"], source["seed"], source["weights"], source["allow_pickle"], source.get("adapters", ())
    )
    dtype = manifest.data["settings"]["dtype"]
    module = build_component(component, model_source, frozenset(entry.features), entry.spec.inputs[0].dtype).module
    if model_sha256(module) != manifest.data["components"][component]["model_sha256"]:
        raise ArtifactError(
            f"the {component} weights rebuilt for {str(manifest.directory)!r} differ from the exported ones "
            f"(preset {manifest.data['preset']!r}, seed {source['seed']}, weights {source['weights']!r}); "
            "the weights file or vgrt changed since export: export again"
        )
    return module, _DTYPES[dtype]
