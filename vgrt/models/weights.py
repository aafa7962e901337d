"""Loading model weights from local files: safetensors always, pickled checkpoints only on request."""

import hashlib
import json
from pathlib import Path

import torch

from vgrt.errors import WeightsError

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
# diffusers components, then transformers components (text and image encoders)
_STEMS = ("diffusion_pytorch_model", "model")
_PICKLED_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
EXPECTED_WEIGHTS = (
    "diffusion_pytorch_model.safetensors (transformers components: model.safetensors), its fp16 variant "
    "(diffusion_pytorch_model.fp16.safetensors), or shards with their index "
    "(diffusion_pytorch_model.safetensors.index.json), as save_pretrained writes them"
)


def find_component_weights(path: Path, component: str) -> tuple[list[Path], dict | None]:
    """The weights files (one, or a sharded set) and config, if any, of `component` under a diffusers folder.

    Accepts the model folder (`path/unet/...`), the component folder itself, or a weights file. Full
    precision is preferred to the fp16 variant, and safetensors to pickled files.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {str(path)!r} does not exist; give a diffusers folder or a .safetensors file")
    if path.is_file():
        return [path], None
    for folder in (path / component, path):
        files = component_weight_files(folder)
        if files:
            config = folder / "config.json"
            return files, json.loads(config.read_text()) if config.is_file() else None
    raise WeightsError(
        f"no {component} weights under {str(path)!r}{_found(path / component)}: expected {component}/ to hold "
        f"{EXPECTED_WEIGHTS} (diffusers layout), or one of them in the folder itself"
    )


def component_weight_files(folder: Path) -> list[Path] | None:
    """The weights files of one component folder, or None when it holds none vgrt knows by name."""
    for variant in ("", ".fp16"):
        for stem in _STEMS:
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if index.is_file():
                return shard_files(index)
    for name in _PICKLED_FILES:
        if (folder / name).is_file():
            return [folder / name]
    return None


def shard_files(index: Path) -> list[Path]:
    """The shards a sharded checkpoint's index names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(
            f"{str(index)!r} is not a shard index: expected JSON with a 'weight_map' of tensor name -> shard file, "
            f"as save_pretrained writes ({err!r})"
        ) from err
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise WeightsError(
            f"the shard index {str(index)!r} names {len(missing)} shard(s) that are not beside it: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; copy every shard of the checkpoint"
        )
    return files


def _found(folder: Path) -> str:
    """' (it holds a, b)' for an existing folder, so that a misnamed file is seen in the message."""
    if not folder.is_dir():
        return f" ({folder.name}/ is missing)"
    names = sorted(p.name for p in folder.iterdir())
    return (
        f" ({folder.name}/ holds {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})"
        if names
        else f" ({folder.name}/ is empty)"
    )


def load_state_dicts(files: list[Path], allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint, whether one file or shards."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict(file, allow_pickle))
    return state


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
