"""Diffusers folders in the layouts SD 1.5, SD 2.1 and SDXL are published in, written here with random weights
by save_pretrained (no download): the preset is read from the configs, fp16 variants and sharded weights load,
the scheduler config is read, a folder of no preset gets a derived one, what runs from a folder matches the
preset path on the same weights, and a missing, misnamed or mismatched file is named with the layout expected."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vgrt.cli import main
from vgrt.errors import WeightsError
from vgrt.export.components import build_component
from vgrt.models.diffusers_folder import write_diffusers_folder
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource
from vgrt.models.unet import build_unet
from vgrt.runtime.schedulers import SchedulerSettings

from ..cli_args import mca_ctrl_args

MODELS = {"unet": "unet", "vae_decoder": "vae", "text_encoder": "text_encoder"}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """tiny (SD 1.x-shaped), seed 0: the weights the tiny preset path builds."""
    return write_diffusers_folder(ModelSource("tiny"), tmp_path_factory.mktemp("published") / "sd")


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """tiny-sdxl, seed 0, as an fp16 variant in shards with their index files."""
    folder = tmp_path_factory.mktemp("published") / "xl"
    return write_diffusers_folder(ModelSource("tiny-sdxl"), folder, variant="fp16", max_shard_size="100KB")


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def modules(source, names):
    """The fp32 modules of `names` (components; 'unet' is the bare diffusers UNet) built from `source`."""
    return {
        name: build_unet(source, frozenset()).unet
        if name == "unet"
        else build_component(name, source, frozenset(), "fp32").module
        for name in names
    }


def test_each_published_layout_names_its_preset_from_its_configs(sd_folder, xl_folder):
    sd, xl = ModelSource(weights=str(sd_folder)), ModelSource(weights=str(xl_folder))
    assert (sd.preset, xl.preset) == ("tiny", "tiny-sdxl")
    assert sd.model_preset().profile == get_preset("tiny").profile
    assert xl.model_preset().is_sdxl and xl.model_preset().force_zeros_for_empty_prompt
    assert ModelSource("tiny", weights=str(sd_folder)) == sd  # naming the folder's own preset is allowed
    assert sorted(p.name for p in xl_folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae",
    ]  # fmt: skip
    assert (xl_folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (xl_folder / "text_encoder_2" / "model.safetensors.index.fp16.json").is_file()


def test_folder_weights_are_the_preset_paths_weights(sd_folder):
    names = [*MODELS, "vae_encoder"]
    # seed 7 draws the modules' initial weights: unless the folder's are loaded over them, they differ
    folder, preset = modules(ModelSource(seed=7, weights=str(sd_folder)), names), modules(ModelSource("tiny"), names)
    for name in names:
        mine, theirs = folder[name].state_dict(), preset[name].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_fp16_variant_shards_load_as_the_fp16_rounded_weights(xl_folder):
    names = ["unet", "text_encoder", "text_encoder_2"]
    folder = modules(ModelSource(seed=7, weights=str(xl_folder)), names)
    preset = modules(ModelSource("tiny-sdxl"), names)
    for name in names:
        mine, theirs = folder[name].state_dict(), preset[name].state_dict()
        for key, value in theirs.items():
            expected = value.half().float() if value.is_floating_point() else value
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], expected), (name, key)


def test_full_precision_weights_are_preferred_to_the_fp16_variant(sd_folder, tmp_path):
    folder = copy_of(sd_folder, tmp_path)
    unet = build_unet(ModelSource("tiny", seed=9), frozenset()).unet
    unet.to(torch.float16).save_pretrained(folder / "unet", variant="fp16")  # beside the full-precision file
    loaded = build_unet(ModelSource(weights=str(folder)), frozenset()).unet.state_dict()
    assert all(
        torch.equal(loaded[k], v) for k, v in build_unet(ModelSource("tiny"), frozenset()).unet.state_dict().items()
    )


def test_the_scheduler_config_is_read_from_the_folder(sd_folder, tmp_path):
    folder = copy_of(sd_folder, tmp_path)
    edit_json(folder / "scheduler" / "scheduler_config.json", beta_end=0.02, timestep_spacing="trailing")
    settings = SchedulerSettings.for_preset(ModelSource(weights=str(folder)).model_preset())
    assert (settings.beta_end, settings.timestep_spacing, settings.prediction_type) == (0.02, "trailing", "epsilon")
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    preset = ModelSource(weights=str(folder)).model_preset()  # tiny predicts epsilon: no preset matches now
    assert preset.name == "custom" and SchedulerSettings.for_preset(preset).prediction_type == "v_prediction"
    edit_json(folder / "scheduler" / "scheduler_config.json", timestep_spacing="even")
    with pytest.raises(WeightsError, match=r"scheduler_config.json'.*unknown timestep_spacing 'even'"):
        ModelSource(weights=str(folder))


def test_a_folder_of_no_preset_gets_one_derived_from_its_configs(sd_folder, tmp_path):
    folder = copy_of(sd_folder, tmp_path)  # a "custom" model: other attention heads, the same weight shapes
    edit_json(folder / "unet" / "config.json", attention_head_dim=8, sample_size=24)
    source = ModelSource(weights=str(folder))
    preset = source.model_preset()
    assert source.preset == preset.name == "custom" and preset.unet["attention_head_dim"] == 8
    assert (preset.profile.latent.min, preset.profile.latent.opt, preset.profile.latent.max) == (12, 24, 48)
    assert preset.profile.context.min == 77 and preset.image_encoder == get_preset("tiny").image_encoder
    assert build_unet(source, frozenset()).unet.config.attention_head_dim == 8
    with pytest.raises(
        WeightsError,
        match=r"are those of 'custom' \(unet/config.json sample_size is 24, tiny has 16; unet/config.json attention_head_dim",
    ):
        ModelSource("tiny", weights=str(folder))


@pytest.fixture(scope="module")
def single_file(sd_folder, tmp_path_factory):
    """tiny, seed 0, as an original-SD single-file checkpoint, with the tokenizer folder beside it."""
    from safetensors.torch import save_file

    from .original_layout import original_checkpoint

    folder = tmp_path_factory.mktemp("single-file")
    built = modules(ModelSource("tiny"), ["unet", "vae_decoder", "text_encoder"])
    save_file(
        original_checkpoint(built["unet"], built["vae_decoder"].vae, built["text_encoder"].model),
        folder / "tiny.safetensors",
    )
    shutil.copytree(sd_folder / "tokenizer", folder / "tokenizer")
    return folder / "tiny.safetensors"


def test_a_single_file_checkpoint_loads_through_diffusers_with_the_shipped_configs(single_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the configs are vgrt's own: nothing is fetched
    source = ModelSource(seed=7, weights=str(single_file))  # seed 7: only loaded weights equal seed 0's
    assert source.preset == "tiny"
    names = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]
    mine, theirs = modules(source, names), modules(ModelSource("tiny"), names)
    for name in names:
        state = theirs[name].state_dict()
        assert all(torch.equal(mine[name].state_dict()[k], state[k]) for k in state), name
    with pytest.raises(WeightsError, match=r"holds unet, vae, text_encoder, not image_encoder"):
        build_component("image_encoder", source, frozenset(), "fp32")


def test_a_single_file_needs_the_tokenizer_beside_it(single_file, tmp_path):
    from vgrt.models.tokenizer import load_tokenizer

    alone = shutil.copy(single_file, tmp_path / "alone.safetensors")
    with pytest.raises(WeightsError, match=r"tokenizer' needs vocab.json and merges.txt .* copy tokenizer/ from"):
        load_tokenizer(ModelSource(weights=str(alone)))


def test_a_unet_only_file_needs_its_preset_named(sd_folder):
    unet_only = str(sd_folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="holds the UNet alone and names no preset; give the preset it is of"):
        ModelSource(weights=unet_only)
    assert ModelSource("tiny", weights=unet_only).model_preset().name == "tiny"


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow), pytest.param("openvino", marks=pytest.mark.slow)],
)  # the engine backends export every component twice (preset and folder): minutes on a shared machine
def test_compose_from_a_folder_needs_no_preset_and_matches_the_preset_path(
    sd_folder, examples, tmp_path, composer_cache, backend
):
    images = {}
    for name, model in (("preset", ["--preset", "tiny"]), ("folder", ["--weights", str(sd_folder)])):
        out = tmp_path / f"{name}.png"
        assert main(mca_ctrl_args(examples, out, "--backend", backend, "--cache", str(composer_cache), *model)) == 0
        images[name] = Image.open(out)
    assert images["folder"].text["vgrt.preset"] == "tiny"
    assert np.array_equal(np.asarray(images["folder"]), np.asarray(images["preset"]))


def test_compose_from_a_single_file_matches_the_preset_path(single_file, examples, tmp_path, composer_cache):
    images = {}
    for name, model in (("preset", ["--preset", "tiny"]), ("file", ["--weights", str(single_file)])):
        out = tmp_path / f"{name}.png"
        assert main(mca_ctrl_args(examples, out, "--backend", "torch", "--cache", str(composer_cache), *model)) == 0
        images[name] = np.asarray(Image.open(out))
    assert np.array_equal(images["file"], images["preset"])


def test_the_gradient_steps_modules_come_from_the_folder(sd_folder, composer_cache):
    from vgrt.runtime.composer import Composer

    with Composer.from_pretrained(sd_folder, backend="torch", cache=composer_cache, progress=False) as composer:
        assert composer.preset.name == "tiny"
        mine = composer.module("vae_decoder").state_dict()
    theirs = modules(ModelSource("tiny"), ["vae_decoder"])["vae_decoder"].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_changed_weights_file_gives_a_new_export_cache_key(sd_folder, tmp_path):
    import os

    from vgrt.export.cache import cache_key
    from vgrt.export.exporter import ExportSettings

    folder = copy_of(sd_folder, tmp_path)
    settings = ExportSettings(preset="tiny", weights=str(folder))
    before = cache_key(settings)
    shard = folder / "vae" / "diffusion_pytorch_model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    assert cache_key(settings) != before


# --- errors: each names the file and the layout expected, before any weights are read ---------------------


def test_missing_tokenizer_and_weights_are_named_together(sd_folder, tmp_path):
    folder = copy_of(sd_folder, tmp_path)
    (folder / "tokenizer" / "merges.txt").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "unet.ckpt")
    with pytest.raises(WeightsError) as caught:
        ModelSource(weights=str(folder))
    message = str(caught.value)
    assert "tokenizer/ lacks merges.txt (CLIP's tokenizer files)" in message
    assert "unet/ holds unet.ckpt, not diffusion_pytorch_model.safetensors" in message
    assert "Expected model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/" in message


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "model_index.json").unlink(), "has no model_index.json; a diffusers folder as published holds"),
        (lambda f: shutil.rmtree(f / "scheduler"), "scheduler/ is missing"),
        (lambda f: (f / "vae" / "config.json").unlink(), "vae/config.json is missing"),
        (lambda f: shutil.rmtree(f / "text_encoder_2"), "text_encoder_2/ is missing"),
        (lambda f: (f / "tokenizer_2" / "vocab.json").unlink(), "tokenizer_2/ lacks vocab.json"),
        (lambda f: next((f / "unet").glob("*00002-of-*")).unlink(), r"names 1 shard\(s\) that are not beside it"),
    ],
)
def test_missing_and_misnamed_files_are_named(xl_folder, tmp_path, damage, message):
    folder = copy_of(xl_folder, tmp_path)
    damage(folder)
    with pytest.raises(WeightsError, match=message):
        build_unet(ModelSource(weights=str(folder)), frozenset())


def test_weights_that_do_not_fit_their_config_are_named(sd_folder, tmp_path):
    folder = copy_of(sd_folder, tmp_path)
    edit_json(folder / "text_encoder" / "config.json", intermediate_size=48)
    source = ModelSource(weights=str(folder))  # a config of no preset: derived, and checked on loading
    with pytest.raises(WeightsError, match=r"text_encoder/model.safetensors' do not fit the model: wrong shape"):
        build_component("text_encoder", source, frozenset(), "fp32")


def test_another_presets_name_is_refused_with_the_folders_own(xl_folder):
    with pytest.raises(WeightsError, match=r"preset 'tiny' was given, but the configs in .* are those of 'tiny-sdxl'"):
        ModelSource("tiny", weights=str(xl_folder))


def test_a_preset_that_is_not_the_folders_is_refused_before_any_work(sd_folder, examples, tmp_path, capsys, no_work):
    assert main(mca_ctrl_args(examples, tmp_path / "out.png", "--preset", "sd15", "--weights", str(sd_folder))) == 2
    assert "preset 'sd15' was given, but the configs in" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


# --- the full-size layouts: configs as published (weights stand-ins: detection reads configs only) ---------

SCHEDULERS = {  # each model's published scheduler_config.json, less keys vgrt does not read
    "sd15": {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
             "trained_betas": None},
    "sd21": {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "timestep_spacing": "leading",
             "interpolation_type": "linear", "steps_offset": 1, "use_karras_sigmas": False},
}  # fmt: skip
QUIRKS = {  # what the published configs hold beyond (or without) the presets' keys
    "sd15": {"vae": {"scaling_factor": None}},  # its vae/config.json predates the key: the class default applies
    "sd21": {"unet": {"upcast_attention": True}},
    "sdxl": {"vae": {"force_upcast": True}},
}


def write_published_configs(folder, name):
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    preset = get_preset(name)
    models = {"unet": preset.unet, "vae": preset.vae, "text_encoder": preset.text_encoder}
    models |= {"text_encoder_2": preset.text_encoder_2} if preset.text_encoder_2 else {}
    index = {"_class_name": "StableDiffusionXLPipeline" if preset.is_sdxl else "StableDiffusionPipeline",
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             **{model: ["diffusers", "x"] for model in [*models, "scheduler", "tokenizer"]}}  # fmt: skip
    if preset.is_sdxl:
        index |= {"tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    for model, config in models.items():
        config = {**config, **QUIRKS[name].get(model, {})}
        config = {k: v for k, v in config.items() if v is not None}
        if model.startswith("text_encoder"):
            CLIPTextConfig(**config, bos_token_id=0, eos_token_id=2, pad_token_id=1).save_pretrained(folder / model)
            save_file({}, folder / model / "model.safetensors")
        else:
            (folder / model).mkdir()
            (folder / model / "config.json").write_text(json.dumps(config))
            save_file({}, folder / model / "diffusion_pytorch_model.safetensors")
    for tokenizer in ("tokenizer", "tokenizer_2") if preset.is_sdxl else ("tokenizer",):
        (folder / tokenizer).mkdir()
        (folder / tokenizer / "vocab.json").write_text("{}")
        (folder / tokenizer / "merges.txt").write_text("#version: 0.2\n")
    (folder / "scheduler").mkdir()
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule | SCHEDULERS[name]))
    return folder


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_the_published_layouts_are_their_presets(tmp_path, name):
    folder = write_published_configs(tmp_path / name, name)
    preset = ModelSource(weights=str(folder)).model_preset()
    assert preset.name == name and preset.profile == get_preset(name).profile
    settings = SchedulerSettings.for_preset(preset)
    assert settings.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
    assert (settings.steps_offset, settings.timestep_spacing, settings.set_alpha_to_one) == (1, "leading", False)


def test_a_distilled_model_of_a_published_family_gets_a_derived_preset(tmp_path):
    folder = write_published_configs(tmp_path / "small", "sd15")
    edit_json(folder / "unet" / "config.json", layers_per_block=1, block_out_channels=[320, 640, 1280])
    edit_json(folder / "unet" / "config.json", down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"])
    edit_json(folder / "unet" / "config.json", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2)
    preset = ModelSource(weights=str(folder)).model_preset()
    assert preset.name == "custom" and preset.latent_factor == 4 and preset.context_dim == 768
    assert (preset.profile.latent.opt, preset.profile.context.max) == (64, 77 + 257)  # ViT-H: sd15's image encoder
    assert preset.vae["scaling_factor"] == 0.18215  # the class default, which the published config leaves out
