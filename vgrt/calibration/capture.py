"""Capture the UNet feeds of real method runs into a calibration set.

A Composer made with `runner_hook` runs its UNet runners wrapped in `RecordingRunner`, which keeps a copy
of every feed (the methods reuse their feed buffers from step to step, so a reference would not do) with
the feature set of the UNet that ran it, read from the runner's spec (`unet_features`). A run may call
several UNet layouts (MCA-Ctrl inverts, and AIComposer steps outside its token window, with the plain
UNet); each is kept, as an entry of its own, so that each can be quantised. After each run the chosen
calls (`CallSelection`: every call, every k-th, or given indices; inversion and denoising calls are
counted together, in the order they ran) are split by layout, each thinned evenly to the run's share of
that layout's `max_samples`, and written as one shard per layout (vgrt.calibration.dataset). Runs already
in the set are skipped, so an interrupted capture resumes where it stopped.

By default the runs are the methods on the example inputs of `vgrt examples` (`example_runs`); any
(compose function, request) pair works, e.g. a request built from a user's own images.
"""

import dataclasses
import functools
import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vgrt.calibration import DEFAULT_MAX_SAMPLES, DEFAULT_SEEDS, DEFAULT_STEPS
from vgrt.calibration.dataset import (
    CalibrationSet,
    CapturedRun,
    SetWriter,
    layout_key,
    open_for_capture,
    read_set,
)
from vgrt.checks import check_seed
from vgrt.engines.base import Runner, RunnerWrapper
from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export.spec import ComponentSpec, unet_spec
from vgrt.models.features import FEATURES, canonical_features, features_text, parse_features
from vgrt.models.presets import Preset
from vgrt.models.source import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallSelection:
    """Which UNet calls of a run to keep: all, every k-th (`every`), or the calls at `indices`."""

    every: int = 1
    indices: frozenset[int] | None = None

    @classmethod
    def parse(cls, text: str) -> "CallSelection":
        """'all', 'every:K' or comma-separated call indices such as '0,5,9'."""
        text = text.strip()
        try:
            if text == "all":
                return cls()
            if text.startswith("every:"):
                every = int(text.removeprefix("every:"))
                if every >= 1:
                    return cls(every=every)
            else:
                indices = frozenset(int(part) for part in text.split(","))
                if indices and min(indices) >= 0:
                    return cls(indices=indices)
        except ValueError:
            pass
        raise InvalidInputError(
            f"--calls {text!r} is not 'all', 'every:K' (K >= 1) or call indices >= 0 such as '0,5,9'"
        )

    def selects(self, index: int) -> bool:
        return index in self.indices if self.indices is not None else index % self.every == 0

    def text(self) -> str:
        if self.indices is not None:
            return ",".join(map(str, sorted(self.indices)))
        return "all" if self.every == 1 else f"every:{self.every}"


@dataclass(frozen=True)
class PlannedRun:
    """One method run to capture: its compose function and request, and the key it is stored under."""

    method: str  # the method, or a variant of it (a benchmark case such as vcf-pno)
    features: str  # the UNet feature set the method runs (vgrt.models.features)
    compose: Callable[[Any, Any], Any]
    request: Any
    seed: int | None

    @property
    def key(self) -> str:
        return f"{self.method}-{request_digest(self.request)[:12]}"

    @property
    def size(self) -> tuple[int, int]:
        """The run's image size in pixels: the request's width and height, else its first image's."""
        if hasattr(self.request, "width"):
            return self.request.width, self.request.height
        image = next(v for f in dataclasses.fields(self.request) if (v := getattr(self.request, f.name)) is not None
                     and isinstance(v, torch.Tensor) and v.ndim == 4)  # fmt: skip
        return image.shape[-1], image.shape[-2]


def plan_runs(name: str, method: Any, request: Any, seeds: Sequence[int] = DEFAULT_SEEDS) -> list[PlannedRun]:
    """`request` of `method` (a vgrt.runtime.methods.registry.Method) once per seed; once only for a
    method without a seed (it starts from an inversion)."""
    if not seeds:
        raise InvalidInputError("--seeds is empty; give at least one seed, e.g. --seeds 0,1")
    for seed in seeds:
        check_seed(seed, "--seeds")
    if not any(field.name == "seed" for field in dataclasses.fields(request)):
        return [PlannedRun(name, method.features, method.compose, request, None)]
    return [
        PlannedRun(name, method.features, method.compose, dataclasses.replace(request, seed=seed), seed)
        for seed in seeds
    ]


def example_runs(
    case: str, model: Preset, size: int | None = None, steps: int = DEFAULT_STEPS, seeds: Sequence[int] = DEFAULT_SEEDS
) -> list[PlannedRun]:
    """The benchmark `case` of `vgrt bench compose` (a method, or a variant such as vcf-pno) on the example
    inputs of `vgrt examples`, at `size` (default: the model's native size)."""
    from vgrt.bench.compose_methods import example_images
    from vgrt.runtime.images import check_preset_image_size
    from vgrt.runtime.methods.registry import BENCHMARKS, Work

    if case not in BENCHMARKS:
        raise InvalidInputError(f"unknown method {case!r}; choose one of: {', '.join(BENCHMARKS)}")
    if steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {steps}")
    size = size or model.profile.latent.opt * model.vae_factor
    check_preset_image_size(model, size, size, what=f"--example-size {size} ({model.name} preset)")
    method, values = BENCHMARKS[case]
    with example_images(model, size) as examples:
        request = method.request(values(examples, Work(steps)), model)
    return plan_runs(case, method, request, seeds)


def request_digest(request: Any) -> str:
    """sha256 over a request's fields, tensors by dtype, shape and bytes: the same request, the same digest."""
    digest = hashlib.sha256(type(request).__name__.encode())
    for field in dataclasses.fields(request):
        digest.update(field.name.encode())
        _digest_value(digest, getattr(request, field.name))
    return digest.hexdigest()


def _digest_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, tuple | list):
        for item in value:
            _digest_value(digest, item)
    elif dataclasses.is_dataclass(value):
        digest.update(request_digest(value).encode())
    else:
        digest.update(repr(value).encode())


def unet_features(spec: ComponentSpec, preset: Preset) -> str:
    """The feature set of the UNet whose spec is `spec`: the one whose spec (vgrt.export.spec.unet_spec)
    has exactly its inputs and outputs (every feature adds inputs or outputs of its own)."""
    names = _tensor_names(spec)
    for features in _feature_sets():
        if _tensor_names(unet_spec(preset, features, "float32", num_blocks=1)) == names:
            return features_text(features)
    raise ArtifactError(
        f"a UNet with inputs {sorted(names)} is none that vgrt exports for {preset.name}; "
        "export it again with this vgrt (`vgrt export --components unet --features ...`)"
    )


def _tensor_names(spec: ComponentSpec) -> frozenset[str]:
    return frozenset(t.name for t in (*spec.inputs, *spec.outputs))


def _feature_sets() -> list[frozenset[str]]:
    """Every valid feature set, the plain UNet first."""
    valid = []
    for count in range(len(FEATURES) + 1):
        for names in itertools.combinations(FEATURES, count):
            try:
                valid.append(parse_features(list(names)))
            except InvalidInputError:  # a feature without the one it needs
                pass
    return valid


@dataclass(frozen=True)
class RecordedCall:
    features: str  # of the UNet that ran it
    feed: dict[str, torch.Tensor]


class RecordingRunner(RunnerWrapper):
    """An active runner that keeps a copy of every feed it runs in `calls`, with its UNet's feature set
    (the backend call is unchanged)."""

    def __init__(self, runner: Runner, features: str, calls: list[RecordedCall]):
        super().__init__(runner)
        self.features, self.calls = features, calls

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        copy = {name: value.detach().to("cpu", copy=True) for name, value in feed.items()}
        self.calls.append(RecordedCall(self.features, copy))
        return self.runner.infer_impl(feed, sizes)


@dataclass(frozen=True)
class LayoutCalls:
    """One UNet layout's share of a run: the calls it made and those kept."""

    features: str
    made: int
    samples: list[dict[str, torch.Tensor]]


class FeedRecorder:
    """The UNet feeds of the composer it hooks into, oldest first, each with its UNet's feature set."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self.calls: list[RecordedCall] = []

    def hook(self, component: str, runner: Runner) -> Runner:
        """For `Composer(runner_hook=...)`: wrap UNet runners, leave the encoders' as they are."""
        if component != "unet":
            return runner
        return RecordingRunner(runner, unet_features(runner.spec, self.preset), self.calls)

    def take(self, selection: CallSelection, quotas: Callable[[str], int]) -> tuple[int, list[LayoutCalls]]:
        """(calls made, per UNet layout in the order first called: its selected calls thinned evenly to
        `quotas(features)`), and forget them. Calls are selected by their index among all the run's calls."""
        calls = list(self.calls)
        self.calls.clear()  # in place: the wrapped runners append to this very list
        made = Counter(call.features for call in calls)
        chosen: dict[str, list[dict[str, torch.Tensor]]] = {features: [] for features in made}
        for index, call in enumerate(calls):
            if selection.selects(index):
                chosen[call.features].append(call.feed)
        layouts = []
        for features, feeds in chosen.items():
            kept = [feeds[i] for i in evenly_spaced(len(feeds), quotas(features))]
            layouts.append(LayoutCalls(features, made[features], kept))
        return len(calls), layouts


def evenly_spaced(count: int, quota: int) -> list[int]:
    """Up to `quota` indices of range(count), first and last included, spread evenly."""
    if count <= quota:
        return list(range(count))
    if quota <= 1:
        return [count // 2] if quota == 1 else []
    return sorted({round(i * (count - 1) / (quota - 1)) for i in range(quota)})


def model_identity(source: ModelSource) -> dict[str, Any]:
    """What a calibration set's feeds depend on besides the requests: the model's weights."""
    weights = str(Path(source.weights).resolve()) if source.weights else None
    return {"preset": source.preset, "weights": weights, "seed": None if weights else source.seed}


def capture(
    directory: str | Path,
    source: ModelSource,
    runs: Sequence[PlannedRun],
    calls: CallSelection = CallSelection(),
    max_samples: int = DEFAULT_MAX_SAMPLES,
    backend: str = "onnxruntime",
    cache: str | Path | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Run each planned run not yet in the set at `directory` and add its chosen UNet feeds; returns the set.

    The set holds at most `max_samples` samples of each UNet layout (feature set), so a method's own layout
    gets as many as when runs kept only it; the runs still to capture share what is left of each equally.
    A run is composed while its method's own layout has samples left.
    """
    from vgrt.runtime.composer import Composer

    if max_samples < 1:
        raise InvalidInputError(f"--max-samples must be >= 1, got {max_samples}")
    with open_for_capture(directory, model_identity(source)) as writer:
        captured = {run.run_key for run in writer.runs.values()}
        pending = [run for run in runs if run.key not in captured]
        held = Counter()  # samples per layout
        for entry in writer.runs.values():
            held[canonical_features(entry.features)] += entry.samples
        if len(runs) > len(pending):
            log.info("%d of %d runs are already in %s: skipping them", len(runs) - len(pending), len(runs), directory)
        if pending and all(held[canonical_features(run.features)] >= max_samples for run in pending):
            log.warning(
                "the set %s already holds --max-samples (%d) samples of the own UNet of every run left: capturing "
                "no more", directory, max_samples,
            )  # fmt: skip
            pending = []
        if pending:
            recorder = FeedRecorder(source.model_preset())
            # the methods' own step bars show too: one run of SD 1.5 takes minutes
            with Composer(source, backend, cache=cache, progress=progress, runner_hook=recorder.hook) as composer:
                bar = tqdm(pending, desc="capture", unit="run", disable=not progress)
                for index, run in enumerate(bar):
                    quota = functools.partial(_share, max_samples, held, len(pending) - index)
                    if quota(canonical_features(run.features)) == 0:
                        log.warning(
                            "--max-samples %d of %s's UNet (features %s) is used up in %s: %d runs left uncaptured",
                            max_samples, run.method, run.features, directory, len(pending) - index,
                        )  # fmt: skip
                        break
                    bar.set_postfix_str(f"{run.method} seed {run.seed}")
                    for entry in _capture_run(composer, recorder, run, calls, quota, writer):
                        held[entry.features] += entry.samples
    return read_set(directory)


def _share(max_samples: int, held: Counter, runs: int, features: str) -> int:
    """A run's quota of a layout: an equal share of what is left of it among the `runs` still to capture."""
    left = max_samples - held[features]
    return max(1, left // runs) if left > 0 else 0


def _capture_run(
    composer: Any,
    recorder: FeedRecorder,
    run: PlannedRun,
    calls: CallSelection,
    quotas: Callable[[str], int],
    writer: SetWriter,
) -> list[CapturedRun]:
    """Compose `run` once and add its chosen UNet feeds to the set, one entry per UNet layout it called."""
    recorder.calls.clear()
    run.compose(composer, run.request)
    made, layouts = recorder.take(calls, quotas)
    kept = [layout for layout in layouts if layout.samples]
    if not kept:
        raise InvalidInputError(
            f"--calls {calls.text()} selects none of the {made} UNet calls of {run.method}; choose calls below {made}"
        )
    entries = [(_entry(run, layout), layout.samples) for layout in kept]
    for entry, _ in entries:
        log.debug("%s: %d of %d UNet calls captured", entry.key, entry.samples, entry.calls)
    return writer.add_entries(entries)


def _entry(run: PlannedRun, layout: LayoutCalls) -> CapturedRun:
    inputs = {
        name: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
        for name, v in layout.samples[0].items()
    }
    key = layout_key(run.key, layout.features)
    return CapturedRun(
        key, run.method, run.seed, run.request.steps, run.size, layout.features, inputs, layout.made,
        len(layout.samples), "", 0, "", run=run.key,
    )  # fmt: skip
