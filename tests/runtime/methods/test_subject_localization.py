"""MCA-Ctrl's masks from text (Grounding DINO + SAM): folders in the published layouts, checked file by
file; the backends agree; the best detection or the union; no detection refused with the hand-drawn way
named; text masks take the path drawn ones take (dilation included); the CLI end to end on tiny.

The folders are tiny with random weights (written by save_pretrained; nothing is downloaded), so these
tests prove the plumbing, shapes, choices and errors, not that a dog is found: random Grounding DINO
scores most queries near 1, which gives detections at the default thresholds, and a threshold of 1
(scores are sigmoids, never over 1) gives none.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from vgrt.cli import main
from vgrt.errors import InvalidInputError, WeightsError
from vgrt.models import grounding
from vgrt.runtime.methods import mca_ctrl, subject_localization
from vgrt.runtime.methods.registry import get_method
from vgrt.runtime.methods.subject_localization import LocalizationSettings

from ...cli_args import mca_ctrl_args
from .inputs import box_mask, random_image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return grounding.write_random_folders(tmp_path_factory.mktemp("slm"), seed=0)


@pytest.fixture
def copies(folders, tmp_path):
    """Copies of the folders a test may break."""
    return tuple(shutil.copytree(folder, tmp_path / folder.name) for folder in folders)


def settings(folders, **changes) -> LocalizationSettings:
    return LocalizationSettings(grounding=str(folders[0]), sam=str(folders[1]), **changes)


def test_random_folders_have_the_published_layouts(folders):
    gd, sam = folders
    assert sorted(p.name for p in gd.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert sorted(p.name for p in sam.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    model, tokenizer, images = grounding.load_grounding_dino(gd)
    assert type(model).__name__ == "GroundingDinoForObjectDetection" and images.size == 128
    assert tokenizer("a dog.")["input_ids"][0] == grounding.BERT_IDS["[CLS]"]
    assert type(grounding.load_sam(sam)[0]).__name__ == "SamModel"


def _remove(folder, name):
    (folder / name).unlink()


def _rename(folder, name, new):
    (folder / name).rename(folder / new)


def _set_config(folder, section, key, value):
    config = json.loads((folder / "config.json").read_text())
    (config[section] if section else config)[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "which, breaks, message",
    [
        (1, lambda f: _remove(f, "config.json"), "has no config.json"),
        (1, lambda f: _rename(f, "model.safetensors", "weights.safetensors"), "has no model.safetensors (it holds: "),
        (1, lambda f: _rename(f, "model.safetensors", "pytorch_model.bin"), "pytorch_model.bin is a pickled"),
        (0, lambda f: _remove(f, "tokenizer.json"), "has no tokenizer.json or vocab.txt"),
        (0, lambda f: _remove(f, "preprocessor_config.json"), "has no preprocessor_config.json"),
        (1, lambda f: _set_config(f, None, "model_type", "grounding-dino"), "is a 'grounding-dino' config, expected"),
        (1, lambda f: _set_config(f, "vision_config", "mlp_dim", 48), "does not fit"),
        (0, lambda f: _set_config(f, None, "d_model", 64), "does not fit"),
    ],
)
def test_a_missing_misnamed_or_mismatched_file_is_named_with_the_layout(copies, which, breaks, message):
    folder = copies[which]
    breaks(folder)
    load = grounding.load_sam if which else grounding.load_grounding_dino
    with pytest.raises(WeightsError) as error:
        load(folder)
    assert message in str(error.value)
    kind = ("grounding_dino", "sam")[which]
    assert str(folder) in str(error.value) and grounding.layout_text(kind) in str(error.value)


def test_a_tokenizer_of_another_vocabulary_is_refused(copies):
    tokenizer = json.loads((copies[0] / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["[CLS]"], vocab["a"] = vocab["a"], vocab["[CLS]"]
    (copies[0] / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(WeightsError, match="tokenizer.json/vocab.txt do not belong to this model"):
        grounding.load_grounding_dino(copies[0])


def test_phrase_masks_equal_the_transformers_builder():
    from transformers.models.grounding_dino import modeling_grounding_dino as module

    special = torch.tensor([101, 102, 1012, 1029])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.tensor([101, 102, 1012, 1029, 7, 8])[torch.randint(0, 6, (2, 12), generator=generator)]
        expected = module.generate_masks_with_special_tokens_and_transfer_map(ids, special)
        for got, want in zip(grounding.phrase_masks(ids, special), expected):
            assert torch.equal(got, want)


def test_the_best_detection_or_the_union(composers, folders):
    localizer = subject_localization.open_localizer(composers("torch"), settings(folders))
    image = random_image(3, size=40)[..., :32]  # not square: the padding and the box scaling are exercised
    detections = localizer.detect(image, "a red ball", settings(folders), "--subject-text")
    assert len(detections) >= 2, "random weights score most queries near 1 (see the module docstring)"
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
    assert all(0 <= d.box[0] <= d.box[2] <= 32 and 0 <= d.box[1] <= d.box[3] <= 40 for d in detections)
    masks = [localizer.segment(image, d.box) for d in detections]
    best = localizer.mask(image, "a red ball", settings(folders), "--subject-text")
    union = localizer.mask(image, "a red ball", settings(folders, detections="union"), "--subject-text")
    assert best.shape == (1, 1, 40, 32) and torch.equal(best, masks[0])
    assert torch.equal(union, torch.stack(masks).amax(0)) and union.sum() >= best.sum()


def test_no_detection_is_refused_suggesting_a_hand_drawn_mask(composers, folders):
    localizer = subject_localization.open_localizer(composers("torch"), settings(folders))
    with pytest.raises(
        InvalidInputError, match=r"found nothing .* draw the mask by hand instead \(--region-mask FILE\)"
    ):
        localizer.mask(random_image(3), "the grass", settings(folders, box_threshold=1.0), "--region-text")


def test_text_inputs_are_checked_before_any_model_runs(composers, folders):
    localizer = subject_localization.open_localizer(composers("torch"), settings(folders))
    with pytest.raises(InvalidInputError, match="names nothing"):
        localizer.mask(random_image(3), " . ", settings(folders), "--subject-text")
    with pytest.raises(InvalidInputError, match=r"is \d+ tokens long; Grounding DINO takes at most 32"):
        localizer.mask(random_image(3), "dog " * 50, settings(folders), "--subject-text")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"box_threshold": 1.5}, "--box-threshold 1.5 is not a score"),
        ({"detections": "all"}, "--detections 'all' is not one of: best, union"),
        ({"sam": None}, "--grounding is given without --sam"),
    ],
)
def test_bad_settings_are_refused(folders, changes, message):
    with pytest.raises(InvalidInputError, match=message):
        dataclasses.replace(settings(folders), **changes).validate()


def test_the_defaults_are_the_released_code_s():
    assert (subject_localization.BOX_THRESHOLD, subject_localization.TEXT_THRESHOLD) == (0.3, 0.25)
    values = get_method("mca-ctrl").values({"subject": "s", "subject_text": "a", "condition": "c", "region_mask": "m"})
    assert (values["box_threshold"], values["text_threshold"], values["detections"]) == (0.3, 0.25, "best")


def request(**changes) -> mca_ctrl.McaCtrlRequest:
    base = mca_ctrl.McaCtrlRequest(
        subject=random_image(1), subject_mask=None, condition=random_image(2), region_mask=box_mask(4, 16, 16, 28),
        subject_text="a red ball", steps=2,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"subject_mask": box_mask(8, 24, 8, 24)}, r"--subject-mask\) or as a text .* \(--subject-text\), not both"),
        ({"subject_text": None}, r"--subject-mask\) or as a text .* \(--subject-text\), not neither"),
        ({"region_mask": None}, r"--region-mask\) or as a text to find in the condition image .*, not neither"),
    ],
)
def test_a_mask_and_a_text_for_one_image_are_refused_naming_both(composers, changes, message, monkeypatch):
    monkeypatch.setattr(subject_localization, "open_localizer", lambda *args: pytest.fail("localized"))
    with pytest.raises(InvalidInputError, match=message):
        mca_ctrl.compose(composers("torch"), request(**changes))
    both = {"subject": "s", "subject_mask": "m", "subject_text": "a", "condition": "c", "region_mask": "m"}
    with pytest.raises(InvalidInputError, match=r"exactly one of --subject-mask or --subject-text, got 2"):
        get_method("mca-ctrl").values(both)


def test_text_masks_take_the_path_of_drawn_masks(composers, folders):
    """Dilation (3x3, as the released code) included: the region found from text composes exactly as the
    same mask drawn by hand."""
    composer = composers("torch")
    localization = settings(folders, detections="union")
    localizer = subject_localization.open_localizer(composer, localization)
    found = localizer.mask(random_image(2), "the grass", localization, "--region-text")
    from_text = mca_ctrl.compose(
        composer, request(region_mask=None, region_text="the grass", localization=localization)
    )
    subject = localizer.mask(random_image(1), "a red ball", localization, "--subject-text")
    drawn = mca_ctrl.compose(composer, request(subject_mask=subject, subject_text=None, region_mask=found))
    torch.testing.assert_close(from_text.latents, drawn.latents)


@pytest.mark.slow  # the first ONNX export of the two models takes about a minute on two cores
def test_every_cpu_backend_finds_the_same_mask(composers, folders):
    image = random_image(4)
    results = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        localizer = subject_localization.open_localizer(composers(backend), settings(folders))
        detections = localizer.detect(image, "a dog", settings(folders), "--subject-text")
        results[backend] = detections[0], localizer.mask(image, "a dog", settings(folders), "--subject-text")
    reference, reference_mask = results["torch"]
    for backend, (found, mask) in results.items():
        assert found.box == pytest.approx(reference.box, abs=1e-3), backend
        assert (mask != reference_mask).float().mean() <= 0.01, backend


def test_compose_from_texts_without_masks(examples, tmp_path, composer_cache):
    """Done means: `vgrt compose mca-ctrl --subject-text ... --region-text ...` and no masks (random folders
    of the preset, written into the cache)."""
    args = mca_ctrl_args(examples, tmp_path / "out.png", "--backend", "torch", "--cache", str(composer_cache))
    for flag, text in (("--subject-mask", "a red ball"), ("--region-mask", "the grass")):
        at = args.index(flag)
        args[at : at + 2] = [flag.replace("-mask", "-text"), text]
    assert main(args) == 0
    assert (tmp_path / "out.png").is_file()
    assert (composer_cache / "slm" / "random-0" / "sam" / "model.safetensors").is_file()


def test_compose_refuses_a_lone_model_folder_before_any_work(examples, tmp_path, folders, capsys):
    args = mca_ctrl_args(examples, tmp_path / "out.png", "--grounding", str(folders[0]))
    at = args.index("--subject-mask")
    args[at : at + 2] = ["--subject-text", "a red ball"]
    assert main(args) == 2
    assert "--grounding is given without --sam" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_a_server_request_cannot_choose_model_folders(tmp_path):
    from vgrt.serve.protocol import HttpError, parse_inputs

    body = json.dumps({"subject_text": "a dog", "grounding": "/models/gd", "sam": "/models/sam"}).encode()
    with pytest.raises(HttpError, match="inputs grounding, sam name folders on the server") as error:
        parse_inputs("application/json", body, tmp_path, frozenset())
    assert error.value.status == 400
