"""Adapter checkpoints in the layouts their authors publish, loaded unchanged: the keys are mapped here.

    ModelSource("sd15", weights="sd15/", adapters=("models/ip-adapter_sd15.safetensors",))

One `Layout` per published format says which vgrt components a file supplies, how its keys name vgrt's
parameters, and how it is known (read from the authors' code, or checked against a released file). A file
is recognized by its keys, not its name, so a renamed download still loads; a folder stands for every
checkpoint directly in it. An `image_encoder/` folder beside a checkpoint (a transformers CLIP vision
model, as IP-Adapter publishes it beside its checkpoints) supplies the image encoder. Every key must match (no silent partial loads), and `check_adapters` refuses an adapter
that does not fit the base model, naming the shapes, from the files' headers before any engine runs.

The UNet part of IP-Adapter (`ip_adapter.<i>.to_k_ip.weight`, `...to_v_ip.weight`) is indexed over
the UNet's attention processors in diffusers' order, self-attention included (so cross-attention
layers have the odd indices 1, 3, 5, ...): the order IP-Adapter loads it in, `ModuleList(unet.attn_
processors.values())`. vgrt's `CrossAttentionProcessor.to_k_extra` / `to_v_extra` are those projections;
IP-Adapter's `scale` (1.0 unless set) is the extra column of `layer_gates`, its attention masks the per-query
`extra_gate`.
"""

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgrt.errors import WeightsError
from vgrt.models.weights import load_state_dict

if TYPE_CHECKING:
    from vgrt.models.presets import Preset
    from vgrt.models.source import ModelSource

UNET = "unet"  # component name of the UNet's extra-token projections (CrossAttentionProcessor)
IMAGE_ENCODER = "image_encoder"
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_PICKLED_SUFFIXES = (".bin", ".pth", ".pt")
_FUSED_TOKENS = 8  # AIComposer's MLP fuses the 4 conditional and 4 unconditional IP-Adapter tokens together


@dataclass(frozen=True)
class Layout:
    """One published checkpoint layout.

    Args:
        name: what the authors call it.
        published: the files as released, and where.
        provenance: how the layout is known; "code only" where no released file could be checked here.
        prefixes: component -> prefix of its keys in the file ('' when the file holds that component only).
        renames: (vgrt name, file name) substitutions inside a key, after the prefix.
        signature: recognizes the layout from the file's keys.
        keys: the expected key names, for error messages.
        dims: the model widths the file's shapes imply (context width, token count, ...).
    """

    name: str
    published: str
    provenance: str
    prefixes: dict[str, str]
    signature: Callable[[set[str]], bool]
    keys: str
    dims: Callable[[dict[str, tuple[int, ...]]], dict[str, int]] = lambda shapes: {}
    renames: tuple[tuple[str, str], ...] = ()

    def file_key(self, component: str, key: str) -> str:
        """The file's name for parameter `key` of vgrt component `component`."""
        for ours, theirs in self.renames:
            key = key.replace(ours, theirs)
        return self.prefixes[component] + key

    def components_in(self, keys: set[str]) -> tuple[str, ...]:
        """The components a file of this layout supplies (all of them but for vgrt's own layout, where
        each prefix present names one)."""
        return tuple(c for c, prefix in self.prefixes.items() if not prefix or any(k.startswith(prefix) for k in keys))


def _ip_adapter_dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    proj, norm = shapes.get("image_proj.proj.weight"), shapes.get("image_proj.norm.weight")
    if proj is None or norm is None:
        return {}
    return {"context width": norm[0], "image tokens": proj[0] // norm[0], "image embed width": proj[1]}


def _mlp_dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    out = shapes.get("mlp.4.weight")  # [fused tokens x context width, hidden]; the code fuses 8 tokens
    if not out:
        return {}
    return (
        {"context width": out[0] // _FUSED_TOKENS} if out[0] % _FUSED_TOKENS == 0 else {"fused token features": out[0]}
    )


def _aligner_dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    first = shapes.get("proj.1.weight")
    return {"context width": first[0], "image token width": first[1]} if first else {}


IP_ADAPTER = Layout(
    name="IP-Adapter",
    published=(
        "h94/IP-Adapter: models/ip-adapter_sd15.safetensors (or .bin) for SD 1.5, "
        "sdxl_models/ip-adapter_sdxl.safetensors (or .bin) for SDXL, each beside its image_encoder/ folder"
    ),
    provenance=(
        "code only: tencent-ailab/IP-Adapter ip_adapter/ip_adapter.py (ImageProjModel, load_ip_adapter) and diffusers' "
        "_convert_ip_adapter_attn_to_diffusers; not checked against the released files here"
    ),
    prefixes={"image_proj": "image_proj.", UNET: "ip_adapter."},
    renames=(("to_k_extra", "to_k_ip"), ("to_v_extra", "to_v_ip")),
    signature=lambda keys: "image_proj.proj.weight" in keys and any(k.startswith("ip_adapter.") for k in keys),
    keys=(
        "image_proj.proj.weight/bias, image_proj.norm.weight/bias, and ip_adapter.<i>.to_k_ip.weight, "
        "ip_adapter.<i>.to_v_ip.weight for each cross-attention layer i (1, 3, 5, ...); a .bin holds the same "
        "as {'image_proj': {...}, 'ip_adapter': {...}}"
    ),
    dims=_ip_adapter_dims,
)

AICOMPOSER_MLP = Layout(
    name="AIComposer fusion MLP",
    published="HF sherlhw/AIComposer: mlp_model/mlp_sdxl.pth (pickled state dict of MLPCLIPFeatureNetwork)",
    provenance=(
        "code only: sherlhw/AIComposer demo.py (MLPCLIPFeatureNetwork, torch.load + load_state_dict); "
        "not checked against the released file here"
    ),
    prefixes={"fusion_mlp": ""},
    signature=lambda keys: keys == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")},
    keys="mlp.0.weight/bias, mlp.2.weight/bias, mlp.4.weight/bias",
    dims=_mlp_dims,
)

VCF_ALIGNER = Layout(
    name="VCF aligner",
    published=(
        "no released weights found; the state dict of ImageToTextAlignerV1 as scripts/vcf/train_img2text_aligner.py "
        "saves it (torch.save(aligner.state_dict(), 'model.pth')), or the same keys as .safetensors"
    ),
    provenance=(
        "code only: thijmennijdam/stable-diffusion-v2 ldm/modules/vcf/aligner.py and "
        "scripts/vcf/train_img2text_aligner.py"
    ),
    prefixes={"aligner": ""},
    signature=lambda keys: keys == {f"proj.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")},
    keys="proj.0.weight/bias (LayerNorm), proj.1.weight/bias, proj.3.weight/bias",
    dims=_aligner_dims,
)

# vgrt's own layout, for the methods whose authors released no weights (LocRef's Appearance-Net, the
# object-level visual prompts' adapters) and for any adapter kept in vgrt's parameter names.
VGRT_COMPONENTS = ("image_proj", "fusion_mlp", "aligner", "appearance_net", "layout_adapter", "appearance_adapter")
VGRT = Layout(
    name="vgrt adapter layout",
    published=(
        "defined by vgrt (no public weights for LocRef or object-level visual prompts): one .safetensors file whose "
        "keys are <component>.<parameter>, the parameter names of vgrt.models.adapters, and the UNet's image-token "
        "projections as unet.<i>.to_k_extra.weight / unet.<i>.to_v_extra.weight (i as IP-Adapter indexes them)"
    ),
    provenance="vgrt's definition",
    # the UNet's projections too: LocRef and visual prompts train them with their adapters
    prefixes={c: f"{c}." for c in (*VGRT_COMPONENTS, UNET)},
    signature=lambda keys: bool(keys) and all(k.split(".", 1)[0] in (*VGRT_COMPONENTS, UNET) for k in keys),
    keys="<component>.<parameter> for components " + ", ".join((*VGRT_COMPONENTS, UNET)),
)

LAYOUTS = (IP_ADAPTER, AICOMPOSER_MLP, VCF_ALIGNER, VGRT)


@dataclass(frozen=True)
class AdapterFile:
    """A checkpoint file, its layout, the components it supplies, and the image encoder folder beside it
    (None when absent)."""

    path: Path
    layout: Layout
    components: tuple[str, ...]
    image_encoder: Path | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)


def adapter_files(paths: tuple[str, ...], allow_pickle: bool = False) -> tuple[AdapterFile, ...]:
    """The checkpoints under `paths` (files, or folders standing for the checkpoints directly in them),
    recognized by their keys; refused when missing, unrecognized, or when two supply one component."""
    files = [_recognize(path, allow_pickle) for given in paths for path in _checkpoints(Path(given))]
    suppliers: dict[str, Path] = {}
    for adapter in files:
        for component in adapter.components:
            # checkpoints in one folder share its image_encoder/
            origin = adapter.image_encoder if component == IMAGE_ENCODER else adapter.path
            if suppliers.setdefault(component, origin) != origin:
                raise WeightsError(
                    f"two adapters supply the {component}: {str(suppliers[component])!r} and {str(origin)!r}; "
                    "give one of them"
                )
    return tuple(files)


def _checkpoints(path: Path) -> list[Path]:
    if not path.exists():
        raise WeightsError(
            f"adapter path {str(path)!r} does not exist; give a checkpoint file (e.g. ip-adapter_sd15.safetensors, "
            "mlp_sdxl.pth) or a folder holding them"
        )
    if path.is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    # IP-Adapter publishes most checkpoints twice: the pickled copy is skipped where its safetensors twin exists.
    found = [p for p in found if not (p.suffix in _PICKLED_SUFFIXES and p.with_suffix(".safetensors") in found)]
    if not found:
        raise WeightsError(
            f"adapter folder {str(path)!r} holds no checkpoint ({', '.join(_CHECKPOINT_SUFFIXES)}); expected the files "
            "as published, e.g. ip-adapter_sd15.safetensors beside image_encoder/, or mlp_sdxl.pth"
        )
    return found


def _recognize(path: Path, allow_pickle: bool) -> AdapterFile:
    stat = path.stat()
    return _recognized(path.resolve(), stat.st_size, stat.st_mtime_ns, allow_pickle)


@functools.lru_cache(maxsize=32)
def _recognized(path: Path, size: int, mtime_ns: int, allow_pickle: bool) -> AdapterFile:
    # Keyed by size and time too: a replaced file is read again. A pickled file is read whole for its
    # shapes, so each one is read once per process, not once per component built from it.
    shapes = checkpoint_shapes(path, allow_pickle)
    keys = set(shapes)
    for layout in LAYOUTS:
        if layout.signature(keys):
            encoder = path.parent / IMAGE_ENCODER if (path.parent / IMAGE_ENCODER).is_dir() else None
            components = layout.components_in(keys) + ((IMAGE_ENCODER,) if encoder else ())
            return AdapterFile(path, layout, components, encoder, shapes)
    shown = ", ".join(sorted(keys)[:4]) + (" ..." if len(keys) > 4 else "")
    expected = "; ".join(f"{layout.name}: {layout.keys}" for layout in LAYOUTS)
    raise WeightsError(f"{str(path)!r} is in no adapter layout vgrt reads (its keys: {shown}); expected: {expected}")


def read_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors under flat keys: a pickled file's nested dicts (IP-Adapter's .bin:
    {'image_proj': {...}, 'ip_adapter': {...}}) are joined with '.', as its safetensors release spells them."""
    return _flatten(load_state_dict(path, allow_pickle), path)


def checkpoint_shapes(path: Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape; a safetensors file's from its header alone (no tensor is read)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as file:
                return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118 (no dict)
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"cannot read adapter {str(path)!r}: {err}; the file is corrupt or truncated") from err
    return {key: tuple(t.shape) for key, t in read_checkpoint(path, allow_pickle).items()}


def _flatten(state: dict, path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, path, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[prefix + key] = value
        else:
            raise WeightsError(
                f"{str(path)!r} holds a {type(value).__name__} under {prefix + key!r}, not a tensor; an adapter "
                "checkpoint is a state dict (tensors, or dicts of tensors)"
            )
    return flat


def supplier(adapters: tuple[AdapterFile, ...], component: str) -> AdapterFile | None:
    return next((a for a in adapters if component in a.components), None)


def load_adapter_weights(
    module: torch.nn.Module, component: str, adapters: tuple[AdapterFile, ...], allow_pickle: bool = False
) -> bool:
    """Load `component`'s weights from the adapter checkpoint that supplies it; False when none does.

    For the UNet, `module` is `ModuleList(unet.attn_processors.values())` (see the module docstring)."""
    adapter = supplier(adapters, component)
    if adapter is None:
        return False
    tensors = read_checkpoint(adapter.path, allow_pickle)
    own = module.state_dict()
    problems = _misfits(adapter, component, {k: tuple(v.shape) for k, v in own.items()}, tensors)
    if problems:
        raise WeightsError(_misfit_message(adapter, component, problems))
    module.load_state_dict({key: tensors[adapter.layout.file_key(component, key)] for key in own})
    return True


def _misfits(
    adapter: AdapterFile, component: str, expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]
) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of `component`, in the file's names."""
    layout, prefix = adapter.layout, adapter.layout.prefixes[component]
    wanted = {layout.file_key(component, key): shape for key, shape in expected.items()}
    mine = {k for k in tensors if k.startswith(prefix)}
    missing = sorted(set(wanted) - mine, key=_natural)
    unexpected = sorted(mine - set(wanted), key=_natural)
    wrong = [
        f"{k} is {list(tensors[k].shape)}, the model takes {list(wanted[k])}"
        for k in sorted(set(wanted) & mine, key=_natural)
        if tuple(tensors[k].shape) != wanted[k]
    ]
    return [
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _misfit_message(adapter: AdapterFile, component: str, problems: list[str]) -> str:
    unchecked = adapter.layout.provenance.startswith("code only")
    return (
        f"adapter {str(adapter.path)!r} ({adapter.layout.name}) does not fit the {component}: {'; '.join(problems)}; "
        f"expected keys: {adapter.layout.keys}"
        + (" (a layout read from the authors' code, not checked against their released files)" if unchecked else "")
    )


def check_adapters(
    adapters: tuple[AdapterFile, ...], expected_dims: dict[str, int], modules: Callable[[str], torch.nn.Module]
) -> None:
    """Refuse adapters that do not fit the base model, from their shapes alone, before any engine runs.

    `expected_dims` are the base model's widths under the names layouts use (context width, image
    tokens, image embed width, image token width, fused token features); `modules(component)` gives the
    module a component loads into (on the meta device: only its shapes are read)."""
    for adapter in adapters:
        found = adapter.layout.dims(adapter.shapes)
        wrong = {name: value for name, value in found.items() if name in expected_dims and value != expected_dims[name]}
        if wrong:
            seen = ", ".join(f"{name} {value}" for name, value in found.items())
            wants = ", ".join(f"{name} {expected_dims[name]}" for name in wrong)
            raise WeightsError(
                f"adapter {str(adapter.path)!r} ({adapter.layout.name}) does not fit the base model: the file is made "
                f"for {seen}; the base model takes {wants}; give the adapter released for this base model"
            )
        for component in adapter.components:
            if component == IMAGE_ENCODER:
                continue
            own = {k: tuple(v.shape) for k, v in modules(component).state_dict().items()}
            shaped = {k: torch.empty(s, device="meta") for k, s in adapter.shapes.items()}
            problems = _misfits(adapter, component, own, shaped)
            if problems:
                raise WeightsError(_misfit_message(adapter, component, problems))


def source_adapters(source: "ModelSource") -> tuple[AdapterFile, ...]:
    """The adapter checkpoints of a model source (`ModelSource.adapters`)."""
    return adapter_files(source.adapters, source.allow_pickle)


def image_encoder_config(source: "ModelSource", preset: "Preset") -> dict[str, Any]:
    """The CLIP image tower's config: from the image_encoder/ folder beside an adapter, else the preset's."""
    adapter = supplier(source_adapters(source), IMAGE_ENCODER)
    config = adapter.image_encoder / "config.json" if adapter else None
    if config is None or not config.is_file():
        return preset.image_encoder
    return {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}


def check_source_adapters(source: "ModelSource", preset: "Preset") -> None:
    """`check_adapters` for a model source against its base model (widths from `preset` and the image encoder)."""
    from vgrt.models.adapters import IP_TOKENS

    adapters = source_adapters(source)
    if not adapters:
        return
    image = image_encoder_config(source, preset)
    widths = {
        "context width": preset.context_dim,
        "image tokens": IP_TOKENS,
        "image embed width": image["projection_dim"],
        "image token width": image["hidden_size"],
        "fused token features": _FUSED_TOKENS * preset.context_dim,
    }
    check_adapters(adapters, widths, functools.partial(_meta_module, source, preset, image))
    _check_image_encoder(adapters, source)


def _check_image_encoder(adapters: tuple[AdapterFile, ...], source: "ModelSource") -> None:
    """IP-Adapter's projection reads the embeds of the image encoder it was trained with: with real weights,
    that encoder must be there (published beside the checkpoint, or in the weights folder)."""
    if not source.weights or (Path(source.weights) / IMAGE_ENCODER).is_dir():
        return  # random preset weights take the preset's encoder; a weights folder may hold the encoder
    for adapter in adapters:
        if adapter.layout is IP_ADAPTER and adapter.image_encoder is None:
            raise WeightsError(
                f"adapter {str(adapter.path)!r} (IP-Adapter) needs the image encoder it was trained with: expected the "
                f"image_encoder/ folder published beside it ({str(adapter.path.parent / IMAGE_ENCODER)!r}), or an "
                f"image_encoder/ folder in {source.weights!r}"
            )


def _meta_module(source: "ModelSource", preset: "Preset", image: dict[str, Any], component: str) -> torch.nn.Module:
    """The module `component` loads into, on the meta device (shapes without memory or init time)."""
    from diffusers import UNet2DConditionModel

    from vgrt.models.adapters import build_adapter
    from vgrt.models.unet import ConditionedUNet, attention_processors, unet_config

    with torch.device("meta"):
        if component != UNET:
            return build_adapter(component, preset.context_dim, image)
        unet = UNet2DConditionModel(**unet_config(source, preset))
        ConditionedUNet(unet, preset, frozenset({"extra_tokens"}))
        return attention_processors(unet)


def reads_adapters(component: str, features: str) -> bool:
    """Whether an export of `component` (the UNet with `features`) can read adapter checkpoints: exports
    that cannot are shared by sources that differ only in their adapters."""
    from vgrt.models.features import parse_features

    return component in (*VGRT_COMPONENTS, IMAGE_ENCODER) or (
        component == UNET and "extra_tokens" in parse_features(features)
    )


def adapter_inputs(paths: tuple[str, ...]) -> list[Path]:
    """Every path the adapters `paths` may read: each one, and the image_encoder/ folder beside a file
    (a folder's own image_encoder/ lies inside it)."""
    inputs = []
    for path in map(Path, paths):
        inputs.append(path)
        if path.is_file() and (path.parent / IMAGE_ENCODER).is_dir():
            inputs.append(path.parent / IMAGE_ENCODER)
    return inputs
