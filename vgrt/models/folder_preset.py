"""A diffusers folder as published: its layout checked, and its Preset read from its configs.

SD 1.5, SD 2.1 and SDXL base are published as folders holding `model_index.json` and one subfolder per
component (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/ and
tokenizer_2/). Which preset a folder is comes from its configs: a folder whose UNet, VAE and text
encoder configs hold every value a preset names, and whose scheduler predicts what the preset predicts,
is that preset. Any other folder of these families (a custom or distilled model) gets a Preset derived
from its configs, named "custom", with shape ranges around its UNet's native size. Either way the
Preset carries the folder's noise schedule (`extra["scheduler"]`), which the samplers read.
"""

import json
import os
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

from vgrt.errors import WeightsError
from vgrt.models.presets import PRESETS, Preset, Range, ShapeProfile, vision_tokens
from vgrt.models.weights import EXPECTED_WEIGHTS, component_weight_files

CUSTOM = "custom"
MODEL_INDEX = "model_index.json"
LAYOUT = (
    "model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/ and "
    "tokenizer_2/), each model folder with its config.json and weights, as diffusers' save_pretrained writes them"
)
# The schedule fields vgrt.runtime.schedulers.SchedulerSettings reads from a scheduler_config.json.
SCHEDULE_FIELDS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "timestep_spacing", "steps_offset", "set_alpha_to_one")  # fmt: skip
_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
_TOKENIZERS = ("tokenizer", "tokenizer_2")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def is_published_folder(weights: str | None) -> bool:
    """Whether `weights` is a folder in the published layout (it holds model_index.json)."""
    return bool(weights) and (Path(weights) / MODEL_INDEX).is_file()


def folder_preset(folder: str | Path) -> Preset:
    """The Preset of a published diffusers folder: a known one when its configs match, else one derived
    from them. The layout is checked first; every problem found is named at once."""
    folder = Path(folder)
    check_layout(folder)
    return _read_preset(folder.resolve(), _config_stamp(folder))


def check_layout(folder: Path) -> None:
    """Refuse a folder that is not in the published layout, naming each missing or misnamed file."""
    index_file = folder / MODEL_INDEX
    if not index_file.is_file():
        raise WeightsError(f"{str(folder)!r} has no {MODEL_INDEX}; a diffusers folder as published holds {LAYOUT}")
    problems = [problem for component in _components(folder) for problem in _component_problems(folder, component)]
    if problems:
        raise WeightsError(
            f"{str(folder)!r} is not a complete diffusers folder: {'; '.join(problems)}. Expected {LAYOUT}"
        )


def preset_differences(preset: Preset, folder: str | Path) -> list[str]:
    """How the folder's configs differ from `preset` ('unet/config.json cross_attention_dim is 1024, sd15 has 768')."""
    return _differences(preset, _read_configs(Path(folder)))


def _components(folder: Path) -> list[str]:
    index = _read_json(folder / MODEL_INDEX)
    listed = {name for name, value in index.items() if isinstance(value, list) and value[0] is not None}
    second = {"text_encoder_2", "tokenizer_2"} & listed
    return ["unet", "vae", "text_encoder", "tokenizer", "scheduler", *sorted(second)]


def _component_problems(folder: Path, component: str) -> list[str]:
    sub = folder / component
    if not sub.is_dir():
        return [f"{component}/ is missing"]
    if component in _TOKENIZERS:
        missing = [name for name in _TOKENIZER_FILES if not (sub / name).is_file()]
        return [f"{component}/ lacks {' and '.join(missing)} (CLIP's tokenizer files)"] if missing else []
    config = "scheduler_config.json" if component == "scheduler" else "config.json"
    problems = [] if (sub / config).is_file() else [f"{component}/{config} is missing"]
    if component != "scheduler" and component_weight_files(sub) is None:
        held = ", ".join(sorted(p.name for p in sub.iterdir() if p.name != config)) or "no weights"
        problems.append(f"{component}/ holds {held}, not {EXPECTED_WEIGHTS}")
    return problems


def _config_stamp(folder: Path) -> tuple[tuple[str, int], ...]:
    """Modification times of the configs, so that an edited folder is read again."""
    names = [MODEL_INDEX, *(f"{m}/config.json" for m in _MODELS), "scheduler/scheduler_config.json"]
    return tuple((name, os.stat(folder / name).st_mtime_ns) for name in names if (folder / name).is_file())


@cache
def _read_preset(folder: Path, stamp: tuple[tuple[str, int], ...]) -> Preset:
    configs = _read_configs(folder)
    schedule = {key: configs["scheduler"][key] for key in SCHEDULE_FIELDS if configs["scheduler"].get(key) is not None}
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    _check_schedule(folder, prediction, schedule)
    for preset in PRESETS.values():
        if not _differences(preset, configs):
            zeros = configs["model_index"].get("force_zeros_for_empty_prompt", preset.force_zeros_for_empty_prompt)
            return replace(preset, extra={**preset.extra, "scheduler": schedule}, force_zeros_for_empty_prompt=zeros)
    return _derived(folder, configs, prediction, schedule)


def _read_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """The public keys of each model config (absent ones are None), an image encoder's config if the folder
    has one, the scheduler config and model_index.json."""
    configs: dict[str, Any] = {}
    for model in _MODELS:
        path = folder / model / "config.json"
        given = {k: v for k, v in _read_json(path).items() if not k.startswith("_")} if path.is_file() else None
        configs[model] = None if given is None else _defaults(model) | given
    image = folder / "image_encoder" / "config.json"
    configs["image_encoder"] = _read_json(image) if image.is_file() else None
    configs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    configs["model_index"] = _read_json(folder / MODEL_INDEX)
    return configs


@cache
def _defaults(model: str) -> dict[str, Any]:
    """The settings a config may leave out, at the values its class takes then (older published configs lack
    keys newer diffusers versions write, such as the VAE's scaling_factor)."""
    import inspect

    if model.startswith("text_encoder"):
        from transformers import CLIPTextConfig

        return {k: v for k, v in CLIPTextConfig().to_dict().items() if not k.startswith("_")}
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_class = UNet2DConditionModel if model == "unet" else AutoencoderKL
    parameters = inspect.signature(model_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read {str(path)!r} ({err}); expected the JSON file save_pretrained writes") from err
    if not isinstance(data, dict):
        raise WeightsError(f"{str(path)!r} holds {type(data).__name__}, not a JSON object of settings")
    return data


def _check_schedule(folder: Path, prediction: str, schedule: dict[str, Any]) -> None:
    from vgrt.errors import InvalidInputError
    from vgrt.runtime.schedulers import SchedulerSettings

    try:
        SchedulerSettings(prediction_type=prediction, **schedule)
    except InvalidInputError as err:
        raise WeightsError(f"{str(folder / 'scheduler' / 'scheduler_config.json')!r}: {err}") from None


def _differences(preset: Preset, configs: dict[str, Any]) -> list[str]:
    differences = []
    for model, wanted in (("unet", preset.unet), ("vae", preset.vae), ("text_encoder", preset.text_encoder)):
        differences += _config_differences(preset.name, model, wanted, configs[model] or {})
    if (preset.text_encoder_2 is None) != (configs["text_encoder_2"] is None):
        has = "has no" if preset.text_encoder_2 else "has a"
        differences.append(f"{preset.name} {has} text_encoder_2/")
    elif preset.text_encoder_2:
        differences += _config_differences(
            preset.name, "text_encoder_2", preset.text_encoder_2, configs["text_encoder_2"]
        )
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if prediction != preset.prediction_type:
        differences.append(
            f"scheduler/scheduler_config.json predicts {prediction}, {preset.name} {preset.prediction_type}"
        )
    return differences


def _config_differences(name: str, model: str, wanted: dict[str, Any], have: dict[str, Any]) -> list[str]:
    return [
        f"{model}/config.json {key} is {have.get(key)!r}, {name} has {value!r}"
        for key, value in wanted.items()
        if _plain(have.get(key)) != _plain(value)
    ]


def _plain(value: Any) -> Any:
    """JSON's lists and the presets' tuples compare equal."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _derived(folder: Path, configs: dict[str, Any], prediction: str, schedule: dict[str, Any]) -> Preset:
    """A Preset of the folder's own configs; the image encoder, when the folder has none, is the one of the
    known preset with the nearest text context width."""
    unet = configs["unet"]
    nearest = min(
        PRESETS.values(), key=lambda p: (abs(p.context_dim - unet["cross_attention_dim"]), p.is_sdxl != _is_sdxl(unet))
    )
    image = configs["image_encoder"] or nearest.image_encoder
    return Preset(
        name=CUSTOM,
        unet=unet,
        vae=configs["vae"],
        text_encoder=configs["text_encoder"],
        text_encoder_2=configs["text_encoder_2"],
        image_encoder=image,
        prediction_type=prediction,
        profile=_derived_profile(unet, configs["text_encoder"], image),
        description=f"derived from the configs in {folder}",
        extra={"scheduler": schedule},
        # SDXL pipelines' default when model_index.json does not say
        force_zeros_for_empty_prompt=configs["model_index"].get("force_zeros_for_empty_prompt", _is_sdxl(unet)),
    )


def _is_sdxl(unet: dict[str, Any]) -> bool:
    return unet.get("addition_embed_type") == "text_time"


def _derived_profile(unet: dict[str, Any], text_encoder: dict[str, Any], image: dict[str, Any]) -> ShapeProfile:
    """Latents from half to twice the UNet's native size (as the presets' ranges go), and text context up
    to the text tokens plus one image's tokens (the longest context a method concatenates)."""
    step = 2 ** (len(unet["block_out_channels"]) - 1)
    native = unet["sample_size"] if isinstance(unet["sample_size"], int) else max(unet["sample_size"])
    opt = -(-native // step) * step
    tokens = text_encoder["max_position_embeddings"]
    return ShapeProfile(
        batch=Range(1, 2, 8),
        latent=Range(max(step, opt // 2 // step * step), opt, 2 * opt),
        context=Range(tokens, tokens, max(2 * tokens, tokens + vision_tokens(image))),
    )
