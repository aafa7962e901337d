"""Every exportable component of a preset: how its module is built and what its export spec is."""

from collections.abc import Callable
from dataclasses import dataclass

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
from vgrt.models.presets import Preset, get_preset, vision_tokens
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

    preset = get_preset(source.preset)
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
    from vgrt.models.encoders import ImageEncoder

    model, config = _clip(source, "image_encoder", preset.image_encoder, vision=True, projected=True)
    return BuiltComponent(
        "image_encoder", ImageEncoder(model).eval(), image_encoder_spec(preset, config, dtype), "image_encoder"
    )


def _adapter(source: ModelSource, preset: Preset, name: str, dtype: str) -> BuiltComponent:
    from vgrt.models import adapters

    image = preset.image_encoder
    source.seed_torch(name)
    if name == "image_proj":
        module = adapters.ImageProjection(image["projection_dim"], preset.context_dim)
        spec = image_proj_spec(preset, image["projection_dim"], module.num_tokens, dtype)
    elif name == "fusion_mlp":
        tokens = 2 * adapters.IP_TOKENS  # cond and uncond tokens, fused together as in the code
        module, spec = adapters.FusionMLP(tokens, preset.context_dim), fusion_mlp_spec(preset, tokens, dtype)
    elif name == "layout_adapter":  # the paper's linear adapter on the global embedding: IP-Adapter's projection form
        module = adapters.ImageProjection(image["projection_dim"], preset.context_dim, adapters.OBJECT_TOKENS)
        spec = layout_adapter_spec(preset, image["projection_dim"], adapters.OBJECT_TOKENS, dtype)
    elif name == "appearance_adapter":
        module = adapters.PerceiverResampler(image["hidden_size"], preset.context_dim)
        tokens = vision_tokens(image)
        spec = appearance_adapter_spec(preset, image["hidden_size"], tokens, adapters.OBJECT_TOKENS, dtype)
    elif name == "aligner":
        module = adapters.ImageToTextAligner(image["hidden_size"], preset.context_dim)
        spec = aligner_spec(preset, image["hidden_size"], vision_tokens(image), dtype)
    else:
        module = adapters.AppearanceNet(image["hidden_size"], preset.context_dim)
        spec = appearance_net_spec(preset, image["hidden_size"], dtype)
    source.load_into(module, name)
    return BuiltComponent(name, module.eval(), spec, name)
