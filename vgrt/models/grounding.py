"""Grounding DINO and SAM from their published transformers folders, checked file by file before loading.

The folders are laid out as `save_pretrained` writes them and as published on the Hugging Face Hub:

    grounding_dino/   (e.g. IDEA-Research/grounding-dino-tiny or -base)
        config.json  model.safetensors  preprocessor_config.json  tokenizer_config.json  tokenizer.json or vocab.txt
    sam/              (e.g. facebook/sam-vit-base, -large or -huge)
        config.json  model.safetensors  preprocessor_config.json

A missing, misnamed or mismatched file is refused with a WeightsError naming the file and this layout.
Weights load strictly (every tensor present, none left over, every shape matching the config): a
checkpoint of another size would otherwise load with random tensors and detect nothing useful.

`write_random_folders` writes tiny folders in these layouts with seeded random weights, for presets
(random weights everywhere) and tests: they run the whole text-to-mask path, not a meaningful detection.

The modules wrap the models for export (`GroundingDinoDetector`, `SamBoxSegmenter`, fixed shapes): two
steps of Grounding DINO that the ONNX exporter cannot translate are swapped for equivalents while
tracing (`exportable_grounding_dino`).
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgrt.errors import WeightsError

GROUNDING_DINO = "grounding_dino"
SAM = "sam"
WEIGHTS_FILE = "model.safetensors"
PICKLED_WEIGHTS = "pytorch_model.bin"
# Files each folder must hold; a tuple inside is "one of these".
LAYOUTS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    GROUNDING_DINO: (
        "config.json", WEIGHTS_FILE, "preprocessor_config.json", "tokenizer_config.json", ("tokenizer.json", "vocab.txt"),
    ),
    SAM: ("config.json", WEIGHTS_FILE, "preprocessor_config.json"),
}  # fmt: skip
MODEL_TYPES = {GROUNDING_DINO: "grounding-dino", SAM: "sam"}
PUBLISHED = {GROUNDING_DINO: "IDEA-Research/grounding-dino-tiny", SAM: "facebook/sam-vit-base"}
# Grounding DINO's text delimiters are bert-base-uncased ids, fixed in transformers (SPECIAL_TOKENS): a
# tokenizer must give [CLS], [SEP], '.' and '?' these ids.
BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def layout_text(kind: str) -> str:
    files = [" or ".join(entry) if isinstance(entry, tuple) else entry for entry in LAYOUTS[kind]]
    return f"{kind}/ with {', '.join(files)} (as {PUBLISHED[kind]} is published)"


def check_folder(folder: str | Path, kind: str) -> Path:
    """`folder` if it holds the files of `kind`'s layout and a config of that model type, else WeightsError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{kind} folder {str(folder)!r} does not exist; expected {layout_text(kind)}")
    for entry in LAYOUTS[kind]:
        names = entry if isinstance(entry, tuple) else (entry,)
        if not any((folder / name).is_file() for name in names):
            raise WeightsError(_missing_message(folder, kind, names))
    model_type = _read_json(folder / "config.json", kind).get("model_type")
    if model_type != MODEL_TYPES[kind]:
        raise WeightsError(
            f"{str(folder / 'config.json')!r} is a {model_type!r} config, expected {MODEL_TYPES[kind]!r}: this is not "
            f"a {kind} folder; expected {layout_text(kind)}"
        )
    return folder


def _missing_message(folder: Path, kind: str, names: tuple[str, ...]) -> str:
    present = sorted(p.name for p in folder.iterdir())
    hint = ""
    if names == (WEIGHTS_FILE,) and PICKLED_WEIGHTS in present:
        hint = (
            f"; {PICKLED_WEIGHTS} is a pickled checkpoint, which can run code when loaded: convert it to {WEIGHTS_FILE}"
        )
    return (
        f"{kind} folder {str(folder)!r} has no {' or '.join(names)} (it holds: {', '.join(present) or 'nothing'})"
        f"{hint}; expected {layout_text(kind)}"
    )


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read {str(path)!r} ({err}); expected {layout_text(kind)}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{str(path)!r} is not a JSON object; expected {layout_text(kind)}")
    return data


@dataclass(frozen=True)
class ImageSettings:
    """The preprocessing of preprocessor_config.json: RGB in [0, 1] resized to `size` on its longer side,
    normalized, padded bottom-right to size x size."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_settings(folder: Path, kind: str) -> ImageSettings:
    """Grounding DINO resizes the shorter side to size['shortest_edge'] (800), SAM the longer side to
    size['longest_edge'] (1024); the exports take one square size, that number."""
    path = folder / "preprocessor_config.json"
    data = _read_json(path, kind)
    key = "shortest_edge" if kind == GROUNDING_DINO else "longest_edge"
    try:
        return ImageSettings(int(data["size"][key]), tuple(data["image_mean"]), tuple(data["image_std"]))
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(
            f"{str(path)!r} lacks a usable {err} entry (size.{key}, image_mean, image_std); expected {layout_text(kind)}"
        ) from None


def load_grounding_dino(folder: str | Path) -> tuple[nn.Module, Any, ImageSettings]:
    """The checked folder's GroundingDinoForObjectDetection (fp32, eval), tokenizer and image settings."""
    import transformers

    folder = check_folder(folder, GROUNDING_DINO)
    model = _load_strictly(transformers.GroundingDinoForObjectDetection, folder, GROUNDING_DINO)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(
            f"cannot load the tokenizer of {str(folder)!r} ({err}); expected {layout_text(GROUNDING_DINO)}"
        ) from None
    wrong = {name: tokenizer.convert_tokens_to_ids(name) for name in ("[CLS]", "[SEP]", ".")}
    if any(wrong[name] != BERT_IDS[name] for name in wrong):
        raise WeightsError(
            f"the tokenizer of {str(folder)!r} gives ids {wrong}, but Grounding DINO splits phrases at bert-base-uncased's "
            f"ids { ({name: BERT_IDS[name] for name in wrong}) }: tokenizer.json/vocab.txt do not belong to this model"
        )
    return model, tokenizer, image_settings(folder, GROUNDING_DINO)


def load_sam(folder: str | Path) -> tuple[nn.Module, ImageSettings]:
    """The checked folder's SamModel (fp32, eval, eager attention: the SDPA form does not export) and
    image settings."""
    import transformers

    folder = check_folder(folder, SAM)
    return _load_strictly(transformers.SamModel, folder, SAM, attn_implementation="eager"), image_settings(folder, SAM)


def _load_strictly(model_class: type, folder: Path, kind: str, **options: Any) -> nn.Module:
    weights = folder / WEIGHTS_FILE
    try:
        with quiet_transformers():  # its own report of a mismatch is replaced by the error below
            model, info = model_class.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **options,
            )  # fmt: skip
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"cannot load {str(weights)!r} with {str(folder / 'config.json')!r} ({first_line}); expected "
            f"{layout_text(kind)}, the weights made for that config"
        ) from None
    problems = {
        label: keys for label, keys in (
            ("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
            ("wrong shape", [key for key, *_ in info.get("mismatched_keys") or ()]),
        ) if keys
    }  # fmt: skip
    if problems:
        detail = "; ".join(
            f"{label}: {', '.join(map(str, sorted(keys)[:3]))} ({len(keys)})" for label, keys in problems.items()
        )
        raise WeightsError(
            f"{str(weights)!r} does not fit {str(folder / 'config.json')!r}: {detail}; expected {layout_text(kind)}, "
            "the weights made for that config"
        )
    return model.float().eval().requires_grad_(False)


class GroundingDinoDetector(nn.Module):
    """Grounding DINO for one image and one padded text: per query, the token logits and the box
    (cx, cy, w, h relative to the image's unpadded part)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids):
        out = self.model(
            pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )  # fmt: skip
        return out.logits, out.pred_boxes


class SamBoxSegmenter(nn.Module):
    """SAM prompted with one box: one low-resolution mask logit map (multimask off, as Grounded-SAM)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_boxes):
        out = self.model(pixel_values=pixel_values, input_boxes=input_boxes, multimask_output=False)
        return out.pred_masks[:, 0], out.iou_scores[:, 0]


@contextmanager
def exportable_grounding_dino() -> Iterator[None]:
    """While tracing: transformers' text-mask builder without cummax/cummin (no ONNX op), and its
    shape assertions (aten._is_all_true, no ONNX op either) off; the shapes are fixed in the export."""
    from unittest import mock

    from transformers.models.grounding_dino import modeling_grounding_dino as module

    with (
        mock.patch.object(module, "generate_masks_with_special_tokens_and_transfer_map", phrase_masks),
        mock.patch.object(module, "torch_compilable_check", lambda *args, **kwargs: None),
    ):
        yield


def phrase_masks(input_ids: torch.Tensor, special_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `generate_masks_with_special_tokens_and_transfer_map`, with each token's previous and
    next delimiter found by a masked max/min over [n, n] instead of cummax/cummin: tokens attend within
    their phrase, positions count from the phrase start."""
    batch, n = input_ids.shape
    special = (input_ids[:, :, None] == special_tokens.to(input_ids.device)).any(-1)
    index = torch.arange(n, device=input_ids.device)
    at_or_before = index[None, :] <= index[:, None]  # [i, j]: j <= i
    previous = torch.where(special[:, None, :] & at_or_before, index, -1).amax(-1)
    previous = torch.cat([previous.new_full((batch, 1), -1), previous[:, :-1]], dim=1)
    following = torch.where(special[:, None, :] & at_or_before.T, index, n).amin(-1)
    valid = (following != 0) & (following != n - 1) & (following != n)
    masks = (following[:, :, None] == following[:, None, :]) & valid[:, None, :]
    masks = masks | torch.eye(n, device=input_ids.device, dtype=torch.bool)
    positions = torch.where(valid, index - previous - 1, 0).clamp(min=0)
    return masks, positions


# Tiny random folders, for presets and tests.

TINY_IMAGE_SIZE = {GROUNDING_DINO: 128, SAM: 64}  # the smallest sizes whose feature maps every level takes
TINY_WORDS = ("a", "an", "the", "red", "ball", "disc", "dog", "cat", "sky", "grass", "person", "on", "of")


def write_random_folders(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Tiny Grounding DINO and SAM folders with seeded random weights under `root` (grounding_dino/,
    sam/), written by save_pretrained in the published layouts; returns their paths."""
    root = Path(root)
    torch.manual_seed(seed)
    with quiet_transformers():
        return _write_grounding_dino(root / GROUNDING_DINO), _write_sam(root / SAM)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports off while vgrt loads or writes a folder."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        transformers_logging.enable_progress_bar()


def _write_grounding_dino(folder: Path) -> Path:
    import transformers

    vocab = [f"[unused{i}]" for i in range(max(BERT_IDS.values()) + 1)]
    for token, index in BERT_IDS.items():
        vocab[index] = token
    for offset, word in enumerate(TINY_WORDS):
        vocab[1013 + offset] = word  # free ids between '.' (1012) and '?' (1029)
    size = TINY_IMAGE_SIZE[GROUNDING_DINO]
    backbone = transformers.SwinConfig(
        image_size=size, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    text = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )  # fmt: skip
    config = transformers.GroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=10, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False,
    )  # fmt: skip
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    transformers.GroundingDinoImageProcessor(size={"shortest_edge": size, "longest_edge": size}).save_pretrained(folder)
    return folder


def _write_sam(folder: Path) -> Path:
    import transformers
    from transformers.models.sam import configuration_sam as sam

    size = TINY_IMAGE_SIZE[SAM]
    vision = sam.SamVisionConfig(
        hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=8,
        window_size=4, global_attn_indexes=[1], mlp_dim=32, num_pos_feats=4,
    )  # fmt: skip
    prompt = sam.SamPromptEncoderConfig(
        hidden_size=8, image_size=size, patch_size=8, mask_input_channels=4, image_embedding_size=size // 8
    )
    decoder = sam.SamMaskDecoderConfig(
        hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=8
    )
    config = transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    transformers.SamModel(config).save_pretrained(folder)
    transformers.SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}
    ).save_pretrained(folder)
    return folder
