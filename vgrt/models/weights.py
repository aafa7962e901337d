"""Loading model weights from local files: safetensors always, pickled checkpoints only on request."""

import hashlib
import json
from pathlib import Path

import torch

from vgrt.errors import WeightsError

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
# diffusers components, then transformers components (text and image encoders)
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def find_component_weights(path: Path, component: str) -> tuple[Path, dict | None]:
    """The weights file (and config, if any) of `component` under a diffusers folder, or a single file.

    Accepts the model folder (`path/unet/...`), the component folder itself, or a weights file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {str(path)!r} does not exist; give a diffusers folder or a .safetensors file")
    if path.is_file():
        return path, None
    for folder in (path / component, path):
        for name in _WEIGHT_FILES:
            if (folder / name).is_file():
                config = folder / "config.json"
                return folder / name, json.loads(config.read_text()) if config.is_file() else None
    raise WeightsError(
        f"no {component} weights under {str(path)!r}: expected {component}/{_WEIGHT_FILES[0]} or "
        f"{component}/{_WEIGHT_FILES[1]} (diffusers layout), or one of them in the folder itself"
    )


def load_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a pickled checkpoint only with `allow_pickle=True` (it can run code)."""
    path = Path(path)
    if path.suffix in _PICKLED:
        if not allow_pickle:
            raise WeightsError(
                f"{str(path)!r} is a pickled checkpoint, which can run arbitrary code when loaded; convert it to "
                "safetensors, or opt in with allow_pickle=True (--allow-pickle on the command line)"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{str(path)!r} is not a .safetensors file (nor a pickled checkpoint)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read weights {str(path)!r}: {err}; the file is corrupt or truncated") from err


def apply_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `module` strictly, naming the keys that do not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise WeightsError(f"weights {str(source)!r} do not fit the model: {detail}; is it the right preset?")
    module.load_state_dict(state)


def model_sha256(module: torch.nn.Module) -> str:
    """Hash of the configs of the diffusers/transformers models inside `module` and of every parameter
    and buffer (names, dtypes, shapes, values): identifies the model an export was made from."""
    digest = hashlib.sha256()
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            # private keys hold bookkeeping such as diffusers' `_use_default_values`, a list made from a
            # set whose order changes from process to process
            public = {k: v for k, v in as_dict.items() if not k.startswith("_")}
            digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
