"""MCA-Ctrl's Subject Localization Module: a mask from an image and a text, by Grounding DINO then SAM.

As the released code (`edit.ipynb`, `demo_en.py`, after Grounded-SAM): the text is lowercased and ends
with '.', Grounding DINO keeps the queries whose best token score is over `box_threshold` (0.3), the
words scoring over `text_threshold` (0.25) name what was found (logged), and SAM, prompted with a box
(one mask, no multimask), segments it; the mask is SAM's logits over 0 at the image's size. Of several
detections the highest-scoring one is kept, or with `detections='union'` the union of every
detection's mask. No detection is an error that suggests drawing the mask by hand. The region mask is
then dilated by MCA-Ctrl itself, as a drawn one is (edit mode: 3x3 kernel, 5 iterations).

Where this deviates: each model runs at one square size, the number in its preprocessor_config.json
(Grounding DINO 800, SAM 1024): the image's longer side is resized to it and the rest padded, with a
pixel mask for Grounding DINO. For square images (every SD size) that is what the processors do; for
other shapes Grounding DINO sees the image at 800 on its longer side where its processor puts 800 on the
shorter. Texts are padded to TEXT_TOKENS tokens (padding is masked out, so it changes no score).

Backends: onnxruntime and openvino run both models as ONNX exports (fp32, made on first use into
`<cache>/slm/`, reused after); torch runs the modules; tensorrt runs the modules in PyTorch on the
composer's GPU (no TensorRT engines of these two yet). A composer's localizer is made once per process.

The models come from `grounding`/`sam` folders (vgrt.models.grounding: the published transformers
layouts), else the `grounding_dino/` and `sam/` subfolders of the composer's weights folder, else, for a
preset with random weights, tiny random folders (so the path runs end to end; their masks mean nothing).
"""

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec, TensorSpec
from vgrt.models import grounding
from vgrt.models.grounding import GROUNDING_DINO, SAM, ImageSettings

log = logging.getLogger(__name__)

BOX_THRESHOLD = 0.3  # Grounded-SAM's and the MCA-Ctrl notebooks' defaults
TEXT_THRESHOLD = 0.25
DETECTIONS = ("best", "union")
TEXT_TOKENS = 64  # the exported text length (at most the model's max_text_len), [CLS] and [SEP] included
SAM_MASK_THRESHOLD = 0.0  # SamProcessor.post_process_masks
EXPORT_OPSET = 23
EXPORT_VERSION = 1  # bumped when the exported graphs change within a vgrt version


@dataclass(frozen=True)
class LocalizationSettings:
    """Where the models come from and how detections are chosen.

    grounding, sam: the transformers folders (None: the weights folder's subfolders, or tiny random ones
    for a preset). box_threshold: a query counts as a detection when its best token score is over this.
    text_threshold: the words scoring over this name the detection (logged). detections: 'best' (the
    highest-scoring detection's mask) or 'union' (every detection's mask together).
    """

    grounding: str | None = None
    sam: str | None = None
    box_threshold: float = BOX_THRESHOLD
    text_threshold: float = TEXT_THRESHOLD
    detections: str = "best"

    def validate(self) -> None:
        for flag, value in (("--box-threshold", self.box_threshold), ("--text-threshold", self.text_threshold)):
            if not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"{flag} {value} is not a score: give a number in [0, 1]")
        if self.detections not in DETECTIONS:
            raise InvalidInputError(f"--detections {self.detections!r} is not one of: {', '.join(DETECTIONS)}")
        if (self.grounding is None) != (self.sam is None):
            given, missing = ("--grounding", "--sam") if self.sam is None else ("--sam", "--grounding")
            raise InvalidInputError(f"{given} is given without {missing}: give both folders, or neither")


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float
    phrase: str  # the words scoring over text_threshold


class Localizer:
    """Grounding DINO and SAM runners (active) with the tokenizer and preprocessing of their folders."""

    def __init__(self, detector: Runner, segmenter: Runner, tokenizer: Any, images: dict[str, ImageSettings]):
        self.detector, self.segmenter, self.tokenizer, self.images = detector, segmenter, tokenizer, images
        self.text_tokens = detector.spec.input("input_ids").shape[1]

    def mask(self, image: torch.Tensor, text: str, settings: LocalizationSettings, flag: str) -> torch.Tensor:
        """The mask [1, 1, H, W] (1 inside) of what `text` (given as `flag`) names in `image` [1, 3, H, W]."""
        detections = self.detect(image, text, settings, flag)
        if not detections:
            raise InvalidInputError(
                f"{flag} {text!r}: Grounding DINO found nothing with a score over --box-threshold "
                f"{settings.box_threshold}; draw the mask by hand instead ({flag.replace('-text', '-mask')} FILE), "
                "lower --box-threshold, or describe the object differently"
            )
        chosen = detections if settings.detections == "union" else detections[:1]
        for found in chosen:
            log.info(
                "%s %r: %r at %s, score %.2f", flag, text, found.phrase, [round(v) for v in found.box], found.score
            )
        masks = [self.segment(image, found.box) for found in chosen]
        mask = torch.stack(masks).amax(0)
        if not mask.any():
            raise InvalidInputError(
                f"{flag} {text!r}: SAM gave an empty mask for the box Grounding DINO found; draw the mask by hand "
                f"instead ({flag.replace('-text', '-mask')} FILE)"
            )
        return mask

    def detect(self, image: torch.Tensor, text: str, settings: LocalizationSettings, flag: str) -> list[Detection]:
        """Every detection of `text` in `image`, highest score first."""
        ids = self._token_ids(text, flag)
        length = len(ids)
        input_ids = torch.zeros(1, self.text_tokens, dtype=torch.int64)
        input_ids[0, :length] = torch.tensor(ids)
        attention_mask = (torch.arange(self.text_tokens) < length).to(torch.int64)[None]
        pixels, pixel_mask, _ = _square(image, self.images[GROUNDING_DINO])
        out = self.detector.infer({
            "pixel_values": pixels, "pixel_mask": pixel_mask.to(torch.int64), "input_ids": input_ids,
            "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
        })  # fmt: skip
        probabilities = out["logits"][0].float().cpu().sigmoid()  # [queries, max_text_len]; padding gives 0
        scores = probabilities.max(-1).values
        height, width = image.shape[2:]
        detections = []
        for query in torch.nonzero(scores > settings.box_threshold).flatten().tolist():
            cx, cy, w, h = out["pred_boxes"][0, query].float().cpu().tolist()
            box = (
                max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height),
                min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height),
            )  # fmt: skip
            words = [ids[i] for i in range(1, length - 1) if probabilities[query, i] > settings.text_threshold]
            detections.append(Detection(box, float(scores[query]), self.tokenizer.decode(words)))
        return sorted(detections, key=lambda found: -found.score)

    def segment(self, image: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
        """SAM's mask [1, 1, H, W] (1 inside) for `box` in `image`, at the image's size."""
        pixels, _, scale = _square(image, self.images[SAM])
        boxes = torch.tensor([[[v * scale for v in box]]], dtype=torch.float32)
        low_res = self.segmenter.infer({"pixel_values": pixels, "input_boxes": boxes})["pred_masks"].float().cpu()
        size = self.images[SAM].size
        height, width = image.shape[2:]
        resized = (round(height * scale), round(width * scale))
        logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        logits = logits[..., : resized[0], : resized[1]]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return (logits > SAM_MASK_THRESHOLD).float()

    def _token_ids(self, text: str, flag: str) -> list[int]:
        caption = text.lower().strip()
        if not caption.strip(".?"):
            raise InvalidInputError(f"{flag} {text!r} names nothing; describe the object, e.g. {flag} 'a dog'")
        caption = caption if caption.endswith(".") else caption + "."  # Grounding DINO's caption form
        ids = self.tokenizer(caption)["input_ids"]
        if len(ids) > self.text_tokens:
            raise InvalidInputError(
                f"{flag} {text!r} is {len(ids)} tokens long; Grounding DINO takes at most {self.text_tokens} here: "
                "shorten it to the object's name"
            )
        return ids


def _square(image: torch.Tensor, settings: ImageSettings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`image` [1, 3, H, W] in [-1, 1] as a model input: the longer side resized to settings.size,
    normalized, padded bottom-right to a square; with the mask of its pixels [1, S, S] and the scale."""
    size = settings.size
    height, width = image.shape[2:]
    scale = size / max(height, width)
    resized = (round(height * scale), round(width * scale))
    rgb = ((image.float().cpu() + 1) / 2).clamp(0, 1)
    rgb = F.interpolate(rgb, size=resized, mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(settings.mean).view(1, 3, 1, 1), torch.tensor(settings.std).view(1, 3, 1, 1)
    pixels = torch.zeros(1, 3, size, size)
    pixels[..., : resized[0], : resized[1]] = (rgb - mean) / std
    pixel_mask = torch.zeros(1, size, size)
    pixel_mask[:, : resized[0], : resized[1]] = 1
    return pixels, pixel_mask, scale


# The localizer of a composer: its folders, their runners on the composer's backend.

_localizers: dict[tuple, Localizer] = {}
_making = threading.Lock()


def open_localizer(composer, settings: LocalizationSettings) -> Localizer:
    """The localizer for `composer`'s backend and device, made on first use and kept for the process."""
    folders = model_folders(composer, settings)
    options = tuple(sorted((k, repr(v)) for k, v in composer.runner_options.items()))
    key = (*map(str, folders), composer.backend, str(composer.device), options)
    with _making:
        if key not in _localizers:
            _localizers[key] = _make_localizer(composer, *folders)
        return _localizers[key]


def model_folders(composer, settings: LocalizationSettings) -> tuple[Path, Path]:
    """The Grounding DINO and SAM folders: given, else in the weights folder, else random for a preset."""
    if settings.grounding is not None:
        return Path(settings.grounding), Path(settings.sam)
    weights = composer.source.weights
    if weights is None:
        return _random_folders(_cache_root(composer), composer.source.seed)
    inside = Path(weights) / GROUNDING_DINO, Path(weights) / SAM
    if any(folder.exists() for folder in inside):
        return inside
    raise InvalidInputError(
        "--subject-text and --region-text need Grounding DINO and SAM: give --grounding DIR and --sam DIR "
        f"(transformers folders such as {grounding.PUBLISHED[GROUNDING_DINO]} and {grounding.PUBLISHED[SAM]}), put "
        f"them in {str(inside[0])!r} and {str(inside[1])!r}, or draw the masks by hand (--subject-mask, --region-mask)"
    )


def _cache_root(composer) -> Path:
    from vgrt.export.cache import cache_root

    return Path(getattr(composer.engines.artifacts, "root", None) or cache_root()) / "slm"


def _random_folders(root: Path, seed: int) -> tuple[Path, Path]:
    """The tiny random folders of `seed`, written once under `root` (atomically, under a lock)."""
    from vgrt.export.staging import atomic_directory, target_lock

    target = root / f"random-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        if not target.is_dir():
            with atomic_directory(target) as staging:
                grounding.write_random_folders(staging, seed)
    return target / GROUNDING_DINO, target / SAM


def _make_localizer(composer, grounding_folder: Path, sam_folder: Path) -> Localizer:
    detector_model, tokenizer, detector_images = grounding.load_grounding_dino(grounding_folder)
    segmenter_model, segmenter_images = grounding.load_sam(sam_folder)
    tokens = min(TEXT_TOKENS, detector_model.config.max_text_len)
    detector = grounding.GroundingDinoDetector(detector_model).eval()
    segmenter = grounding.SamBoxSegmenter(segmenter_model).eval()
    runners = [
        _runner(composer, module, spec, folder)
        for module, spec, folder in (
            (detector, detector_spec(detector_model.config, detector_images, tokens), grounding_folder),
            (segmenter, segmenter_spec(segmenter_model.config, segmenter_images), sam_folder),
        )
    ]
    return Localizer(*runners, tokenizer, {GROUNDING_DINO: detector_images, SAM: segmenter_images})


def detector_spec(config: Any, images: ImageSettings, tokens: int) -> ComponentSpec:
    size, ids = images.size, (1, tokens)
    vocab = config.text_config.vocab_size
    return ComponentSpec(
        name=GROUNDING_DINO,
        inputs=(
            TensorSpec("pixel_values", "float32", (1, 3, size, size), "normalized RGB, padded bottom-right"),
            TensorSpec("pixel_mask", "int64", (1, size, size), "1 = image pixel, 0 = padding", (0, 1)),
            TensorSpec("input_ids", "int64", ids, "caption token ids, padded with 0", (0, vocab - 1)),
            TensorSpec("attention_mask", "int64", ids, "1 = caption token", (0, 1)),
            TensorSpec("token_type_ids", "int64", ids, "zeros", (0, 0)),
        ),
        outputs=(
            TensorSpec("logits", "float32", (1, config.num_queries, config.max_text_len), "per query and token"),
            TensorSpec("pred_boxes", "float32", (1, config.num_queries, 4), "cx, cy, w, h in [0, 1]"),
        ),
        dims={},
    )


def segmenter_spec(config: Any, images: ImageSettings) -> ComponentSpec:
    size = images.size
    low_res = 4 * config.prompt_encoder_config.image_embedding_size
    return ComponentSpec(
        name=SAM,
        inputs=(
            TensorSpec("pixel_values", "float32", (1, 3, size, size), "normalized RGB, padded bottom-right"),
            TensorSpec("input_boxes", "float32", (1, 1, 4), "x0, y0, x1, y1 in the resized image's pixels"),
        ),
        outputs=(
            TensorSpec("pred_masks", "float32", (1, 1, low_res, low_res), "mask logits of the padded square"),
            TensorSpec("iou_scores", "float32", (1, 1), "predicted mask quality"),
        ),
        dims={},
    )


def _runner(composer, module: torch.nn.Module, spec: ComponentSpec, folder: Path) -> Runner:
    """The component on the composer's backend: ONNX on onnxruntime and openvino, PyTorch otherwise."""
    from vgrt.engines.torch_runner import TorchRunner

    if composer.backend in ("torch", "tensorrt"):
        options = composer.runner_options if composer.backend == "torch" else {}
        return TorchRunner(module, spec, device=str(composer.device), **options).activate()
    directory = _cached_export(module, spec, folder, _cache_root(composer))
    files = json.loads((directory / "files.json").read_text())
    if composer.backend == "openvino":
        from vgrt.engines.openvino_runner import OpenVinoRunner, OpenVinoSettings

        settings = OpenVinoSettings(**composer.runner_options)
        return OpenVinoRunner(directory / "model.onnx", spec, files, settings).activate()
    from vgrt.engines.ort_runner import OrtRunner, OrtSettings

    settings = dict(composer.runner_options)
    if composer.device.type == "cuda":
        settings.update(provider="cuda", device_id=composer.device.index)
    return OrtRunner(directory / "model.onnx", spec, OrtSettings(**settings)).activate()


def _cached_export(module: torch.nn.Module, spec: ComponentSpec, folder: Path, root: Path) -> Path:
    """The ONNX export of `module` in `root`, keyed by the folder's files, the spec and the versions;
    made on first use under the entry's lock, written whole or not at all."""
    from vgrt.export.staging import atomic_directory, target_lock

    directory = root / f"{spec.name}-{_export_key(spec, folder)}"
    root.mkdir(parents=True, exist_ok=True)
    with target_lock(directory):
        if not (directory / "files.json").is_file():
            log.info("exporting %s from %s to ONNX (first use; reused after)", spec.name, folder)
            with atomic_directory(directory) as staging:
                _export(module, spec, staging)
    return directory


def _export_key(spec: ComponentSpec, folder: Path) -> str:
    import transformers

    import vgrt
    from vgrt.export.cache import weights_fingerprint

    identity = {
        "spec": spec.to_json(), "folder": weights_fingerprint(str(folder)), "opset": EXPORT_OPSET,
        "version": EXPORT_VERSION, "versions": [vgrt.__version__, torch.__version__, transformers.__version__],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _export(module: torch.nn.Module, spec: ComponentSpec, folder: Path) -> None:
    """Trace `module` at the spec's fixed shapes into folder/model.onnx (weights beside it when over
    protobuf's 2 GB), and record every file's size and sha256 in folder/files.json."""
    import onnx

    from vgrt.export.exporter import PROTOBUF_LIMIT, trace_to_onnx
    from vgrt.export.verify import stamp_file
    from vgrt.library_noise import torch_onnx_warnings_translated

    with torch_onnx_warnings_translated(spec.name), grounding.exportable_grounding_dino():
        model = trace_to_onnx(module, spec, EXPORT_OPSET)
    external = sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT // 2
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=external, location="model.onnx.data")
    files = {}
    for file in sorted(folder.iterdir()):
        stamp = stamp_file(file)
        files[file.name] = {"bytes": stamp.bytes, "sha256": stamp.sha256}
    (folder / "files.json").write_text(json.dumps(files, indent=1))
