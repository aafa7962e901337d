"""`vgrt compose METHOD --weights DIR` for every method, from a diffusers folder in the published layout and the
method's adapter checkpoints in their published layouts (vgrt's own layout where no weights are published).

Folder and checkpoints hold the weights the preset path builds from its seed, so the image must be the preset
path's, pixel for pixel. The CLI's folder weights fall back to that same seed, so a second test builds every
module a method runs from the files with another seed: it equals the preset path's only if no weight of it was
left to the seed. Prompts are empty: the folder's tokenizer (CLIP's format, vgrt.models.diffusers_folder)
numbers the preset vocabulary's tokens otherwise than the preset path's tokenizer, bar the start and end tokens.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vgrt.cli import main
from vgrt.export.components import build_component
from vgrt.models.diffusers_folder import write_diffusers_folder
from vgrt.models.source import ModelSource

from .cli_args import mca_ctrl_args
from .models.test_adapter_checkpoints import write_aicomposer_release, write_image_encoder

EXTRA = frozenset({"extra_tokens"})
SIZE = ["--size", "32x32", "--steps", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """preset -> its base model (seed 0, the preset path's weights) as a published diffusers folder."""
    root = tmp_path_factory.mktemp("published")
    return {preset: write_diffusers_folder(ModelSource(preset), root / preset) for preset in ("tiny", "tiny-sdxl")}


def adapter_states(preset: str, *components: str) -> dict[str, dict[str, torch.Tensor]]:
    """The preset path's (seeded) weights of each adapter component, under vgrt's parameter names."""
    return {c: build_component(c, ModelSource(preset), frozenset(), "float32").module.state_dict() for c in components}


def vgrt_layout(folder: Path, name: str, preset: str, *components: str) -> list[str]:
    """vgrt's adapter layout (LocRef, visual prompts: no published weights): one file of
    `<component>.<parameter>` keys, the UNet's image-token projections under `unet.`, with the image
    encoder's transformers folder beside it."""
    from vgrt.models.unet import attention_processors, build_unet

    folder.mkdir(parents=True)
    states = adapter_states(preset, *components)
    states["unet"] = attention_processors(build_unet(ModelSource(preset), EXTRA).unet).state_dict()
    save_file({f"{c}.{k}": v.contiguous() for c, state in states.items() for k, v in state.items()}, folder / name)
    write_image_encoder(folder, ModelSource(preset))
    return ["--adapter", str(folder)]


def vcf_aligner(folder: Path, preset: str) -> list[str]:
    """VCF's aligner as its training script saves it (`torch.save(aligner.state_dict(), 'model.pth')`)."""
    folder.mkdir(parents=True)
    torch.save(adapter_states(preset, "aligner")["aligner"], folder / "model.pth")
    write_image_encoder(folder, ModelSource(preset))
    return ["--adapter", str(folder), "--allow-pickle"]


def aicomposer_release(folder: Path, preset: str) -> list[str]:
    """IP-Adapter (with its image_encoder/) and AIComposer's mlp_sdxl.pth, as downloaded."""
    folder.mkdir(parents=True)
    ip_adapter, mlp = write_aicomposer_release(folder, ModelSource(preset))
    return ["--adapter", str(Path(ip_adapter).parent), "--adapter", mlp, "--allow-pickle"]


def method_args(method: str, examples: Path) -> list[str]:
    """The method's inputs: the example images at 32x32, 2 or 3 steps."""
    box = (examples / "box.txt").read_text().strip()
    subject = str(examples / "subject.png")
    return {
        "mca-ctrl": mca_ctrl_args(examples, Path("unused"))[2:-2],
        "aicomposer": ["--foreground", subject, "--foreground-mask", str(examples / "subject_mask.png"),
                       "--background", str(examples / "scene.png"), "--box", "4,4,20,20", "--steps", "3"],
        "locref": ["--prompt", "", "--reference", subject, "--box", box, *SIZE],
        "vcf": ["--prompt", "", "--reference", subject, "--pno-steps", "1", *SIZE],
        "visual-prompts": ["--object", subject, "--box", box, "--guidance-steps", "1", *SIZE],
    }[method]  # fmt: skip


CASES = {  # (method, preset) -> the adapter checkpoints it takes, written into a folder
    ("mca-ctrl", "tiny"): lambda folder, preset: [],  # the base model alone
    ("aicomposer", "tiny"): aicomposer_release,
    ("aicomposer", "tiny-sdxl"): aicomposer_release,
    ("locref", "tiny"): lambda folder, preset: vgrt_layout(folder, "locref.safetensors", preset, "appearance_net"),
    ("vcf", "tiny"): vcf_aligner,
    ("visual-prompts", "tiny"): lambda folder, preset: vgrt_layout(
        folder, "visual-prompts.safetensors", preset, "layout_adapter", "appearance_adapter"
    ),
}


def compose(args: list[str], out: Path) -> np.ndarray:
    assert main([*args, "--out", str(out)]) == 0
    return np.asarray(Image.open(out))


@pytest.mark.parametrize(("method", "preset"), list(CASES), ids=[f"{m}-{p}" for m, p in CASES])
def test_each_method_composes_from_published_files_as_from_its_preset(
    folders, examples, tmp_path, composer_cache, method, preset
):
    common = ["compose", method, *method_args(method, examples), "--backend", "torch", "--cache", str(composer_cache)]
    adapters = CASES[method, preset](tmp_path / "adapters", preset)
    expected = compose([*common, "--preset", preset], tmp_path / "preset.png")
    got = compose([*common, "--weights", str(folders[preset]), *adapters], tmp_path / "published.png")
    assert Image.open(tmp_path / "published.png").text["vgrt.preset"] == preset
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("method", "preset"), list(CASES), ids=[f"{m}-{p}" for m, p in CASES])
def test_every_module_a_method_runs_is_loaded_from_the_files(folders, tmp_path, method, preset):
    """The CLI's weights draw their fallbacks from the preset path's seed; from seed 7 every module a method
    runs is still the preset path's only if every weight of it comes from the files."""
    from vgrt.models.features import parse_features
    from vgrt.runtime.methods.registry import get_method

    adapters = CASES[method, preset](tmp_path / "adapters", preset)
    paths = tuple(adapters[i + 1] for i, arg in enumerate(adapters) if arg == "--adapter")
    loaded = ModelSource(seed=7, weights=str(folders[preset]), adapters=paths, allow_pickle=True)
    spec = get_method(method)
    for component in ("unet", *spec.components):
        features = parse_features(spec.features) if component == "unet" else frozenset()
        mine = build_component(component, loaded, features, "float32").module.state_dict()
        theirs = build_component(component, ModelSource(preset), features, "float32").module.state_dict()
        assert mine.keys() == theirs.keys(), component
        assert [k for k in theirs if not torch.equal(mine[k], theirs[k])] == [], component


def test_from_pretrained_runs_a_method_on_the_folder_and_its_adapters(
    folders, examples, tmp_path, composers, composer_cache
):
    from vgrt.models.presets import get_preset
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.methods.registry import get_method

    method = get_method("visual-prompts")
    adapters = CASES["visual-prompts", "tiny"](tmp_path / "adapters", "tiny")[1::2]
    box = (examples / "box.txt").read_text().strip()
    inputs = {"object": [str(examples / "subject.png")], "box": [box], "size": "32x32", "steps": 2, "guidance_steps": 1}
    expected = method.compose(composers("torch"), method.request(inputs, get_preset("tiny"))).image
    settings = {"backend": "torch", "cache": composer_cache, "progress": False}
    with Composer.from_pretrained(folders["tiny"], adapters=adapters, **settings) as composer:
        assert composer.source.adapters == (str(tmp_path / "adapters"),)
        got = method.compose(composer, method.request(inputs, composer.preset)).image
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_from_pretrained_refuses_an_adapter_of_another_base_model_before_any_work(folders, tmp_path, no_work):
    from vgrt.errors import WeightsError
    from vgrt.runtime.composer import Composer

    sdxl_release = aicomposer_release(tmp_path / "sdxl", "tiny-sdxl")[1::2]  # made for tiny-sdxl's context width
    with pytest.raises(WeightsError, match=r"ip-adapter_sdxl\.safetensors' \(IP-Adapter\) does not fit the base model"):
        Composer.from_pretrained(folders["tiny"], adapters=sdxl_release, allow_pickle=True, backend="torch")


# onnxruntime exports every component twice (the preset's and the folder's): about a minute on a busy machine
@pytest.mark.slow
def test_a_method_composes_from_published_files_on_onnxruntime(folders, examples, tmp_path, composer_cache):
    common = [
        "compose",
        "vcf",
        *method_args("vcf", examples),
        "--backend",
        "onnxruntime",
        "--cache",
        str(composer_cache),
    ]
    expected = compose([*common, "--preset", "tiny"], tmp_path / "preset.png")
    adapters = vcf_aligner(tmp_path / "adapters", "tiny")
    np.testing.assert_array_equal(
        compose([*common, "--weights", str(folders["tiny"]), *adapters], tmp_path / "f.png"), expected
    )
