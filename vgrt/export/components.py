"""Every exportable component of a preset: how its module is built and what its export spec is."""

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from vgrt.errors import InvalidInputError
from vgrt.export.encoder_specs import (
    aligner_spec,
    appearance_adapter_spec,
    appearance_net_spec,
    fusion_mlp_spec,
    image_encoder_spec,
    image_proj_spec,
    layout_adapter_spec,
    text_encoder_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)  # fmt: skip
from vgrt.export.spec import ComponentSpec, unet_spec
from vgrt.models.presets import Preset, vision_tokens
from vgrt.models.source import ModelSource

COMPONENTS = (
    "unet", "vae_encoder", "vae_decoder", "text_encoder", "text_encoder_2", "image_encoder",
    "image_proj", "fusion_mlp", "appearance_net", "aligner", "layout_adapter", "appearance_adapter",
)  # fmt: skip


@dataclass(frozen=True)
class BuiltComponent:
    name: str
    module: nn.Module
    spec: ComponentSpec
    weights_folder: str  # subfolder of a diffusers weights folder the weights come from


def parse_components(text: str, preset: Preset) -> tuple[str, ...]:
    """'all' (every component the preset has) or comma-separated names."""
    available = [c for c in COMPONENTS if c != "text_encoder_2" or preset.text_encoder_2]
    names = available if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown component(s) {unknown or text!r} for preset {preset.name!r}; choose from: {', '.join(available)}, or 'all'"
        )
    return tuple(dict.fromkeys(names))


def _vae(source: ModelSource, preset: Preset):
    from diffusers import AutoencoderKL

    config = source.folder_config("vae") or preset.vae
    source.seed_torch("vae")
    vae = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    source.load_into(vae, "vae")
    return vae


def _clip(source: ModelSource, folder: str, config: dict, vision: bool, projected: bool):
    import transformers

    config = source.folder_config(folder) or config
    if vision:
        model_class, config_class = transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig
    else:
        model_class = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
        config_class = transformers.CLIPTextConfig
    source.seed_torch(folder)
    model = model_class(config_class(**{k: v for k, v in config.items() if not k.startswith("_")}))
    source.load_into(model, folder)
    return model, config


def build_component(name: str, source: ModelSource, features: frozenset[str], dtype: str) -> BuiltComponent:
    """The module (fp32, eval, CPU) and spec of component `name`; features apply to the UNet only."""
    from vgrt.models import encoders
    from vgrt.models.unet import build_unet

    preset = source.model_preset()
    if name == "unet":
        unet = build_unet(source, features)
        return BuiltComponent(
            name, unet, unet_spec(preset, features, dtype, unet.num_blocks, dict(unet.unet.config)), "unet"
        )
    if name in ("vae_encoder", "vae_decoder"):
        vae = _vae(source, preset)
        config = dict(vae.config)
        if name == "vae_encoder":
            return BuiltComponent(name, encoders.VaeEncoder(vae).eval(), vae_encoder_spec(preset, config, dtype), "vae")
        return BuiltComponent(name, encoders.VaeDecoder(vae).eval(), vae_decoder_spec(preset, config, dtype), "vae")
    builders: dict[str, Callable[[], BuiltComponent]] = {
        "text_encoder": lambda: _text(source, preset, "text_encoder", preset.text_encoder, dtype),
        "text_encoder_2": lambda: _text(source, preset, "text_encoder_2", preset.text_encoder_2, dtype),
        "image_encoder": lambda: _image(source, preset, dtype),
        "image_proj": lambda: _adapter(source, preset, "image_proj", dtype),
        "fusion_mlp": lambda: _adapter(source, preset, "fusion_mlp", dtype),
        "appearance_net": lambda: _adapter(source, preset, "appearance_net", dtype),
        "aligner": lambda: _adapter(source, preset, "aligner", dtype),
        "layout_adapter": lambda: _adapter(source, preset, "layout_adapter", dtype),
        "appearance_adapter": lambda: _adapter(source, preset, "appearance_adapter", dtype),
    }
    if name not in builders or (name == "text_encoder_2" and not preset.text_encoder_2):
        parse_components(name, preset)  # raises with the list of valid names
    return builders[name]()


def _text(source: ModelSource, preset: Preset, folder: str, config: dict, dtype: str) -> BuiltComponent:
    from vgrt.models.encoders import TextEncoder

    model, config = _clip(source, folder, config, vision=False, projected=folder == "text_encoder_2")
    return BuiltComponent(folder, TextEncoder(model).eval(), text_encoder_spec(preset, config, dtype, folder), folder)


def _image(source: ModelSource, preset: Preset, dtype: str) -> BuiltComponent:
    from vgrt.models.adapter_checkpoints import IMAGE_ENCODER, source_adapters, supplier
    from vgrt.models.encoders import ImageEncoder

    adapter = supplier(source_adapters(source), IMAGE_ENCODER)
    if adapter is not None:  # the image_encoder/ folder published with the adapter, a transformers folder
        source = replace(source, weights=str(adapter.image_encoder), adapters=())
    model, config = _clip(source, "image_encoder", preset.image_encoder, vision=True, projected=True)
    return BuiltComponent(
        "image_encoder", ImageEncoder(model).eval(), image_encoder_spec(preset, config, dtype), "image_encoder"
    )


def _adapter(source: ModelSource, preset: Preset, name: str, dtype: str) -> BuiltComponent:
    """An adapter's module, with weights from the adapter checkpoint that supplies it, else from the
    weights folder (`<name>/model.safetensors`), else from the seed."""
    from vgrt.models.adapter_checkpoints import image_encoder_config, load_adapter_weights, source_adapters
    from vgrt.models.adapters import build_adapter

    image = image_encoder_config(source, preset)
    source.seed_torch(name)
    module = build_adapter(name, preset.context_dim, image)
    if not load_adapter_weights(module, name, source_adapters(source), source.allow_pickle):
        source.load_into(module, name)
    return BuiltComponent(name, module.eval(), _adapter_spec(name, preset, image, dtype), name)


def _adapter_spec(name: str, preset: Preset, image: dict, dtype: str) -> ComponentSpec:
    from vgrt.models.adapters import IP_TOKENS, OBJECT_TOKENS

    if name == "image_proj":
        return image_proj_spec(preset, image["projection_dim"], IP_TOKENS, dtype)
    if name == "fusion_mlp":
        return fusion_mlp_spec(preset, 2 * IP_TOKENS, dtype)
    if name == "layout_adapter":
        return layout_adapter_spec(preset, image["projection_dim"], OBJECT_TOKENS, dtype)
    if name == "appearance_adapter":
        return appearance_adapter_spec(preset, image["hidden_size"], vision_tokens(image), OBJECT_TOKENS, dtype)
    if name == "aligner":
        return aligner_spec(preset, image["hidden_size"], vision_tokens(image), dtype)
    return appearance_net_spec(preset, image["hidden_size"], dtype)
