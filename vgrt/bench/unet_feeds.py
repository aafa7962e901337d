"""The conditioned UNet against the plain one on the methods' real feeds: `vgrt bench unet --feeds SET`.

Issue 12's target: a conditioned UNet call costs at most 1.10x the plain UNet's at the same batch on the
same backend, in every method's real feeds. A calibration set (`vgrt calibrate METHOD --capture-only
--set SET`, vgrt.calibration) holds those feeds: the UNet inputs of real method runs, as they were fed.

Phases: the captured calls are grouped by their sizes (every dynamic dim of the conditioned export's
spec: batch, latent, context, and the feature dims such as extra tokens, regions or groups) and by which
gated features `layer_gates` switches on (any block), per feature set. One feed per group, the first
captured, is timed: a static graph's work follows from the shapes and the gates, not from the other
values. Each captured feed stands for run.calls / run.samples of its run's calls (a capture thins a run's
calls evenly); run.calls also counts calls of another layout the capture left out (MCA-Ctrl's plain
inversion), so a method's share of the whole is counted high there, its own ratio is not.

Plain: the captured feed restricted to the plain export's inputs (sample, timestep, text) is fed to the
plain UNet (features none): the same batch and sizes. Phases with the same plain sizes share one plain
competitor, whose cost depends on nothing else.

Every competitor (each phase's conditioned UNet and each plain size's plain UNet, on each backend) is
timed in the same interleaved rounds, each turn a child process of its own (vgrt.bench.unet_suite says
what is timed and what is not). Reported per phase and backend: conditioned / plain of the median
times; and weighted by calls, per method and for every call of the set: sum(calls x conditioned) /
sum(calls x plain), what the UNet calls of those runs cost over what the plain UNet would.

The conditioned export is --export-dir (runs of other inputs are left out, and listed), else the export
cache's for the set's model, each run's feature set and the feeds' precision; the plain one is
--plain-export-dir, else the cache's. A captured feed goes to its export as it is, so the set works with
any feature set's inputs as the export's spec names them.
"""

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vgrt.bench.child import run_in_child
from vgrt.bench.results import Case, Measurement, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.bench.unet_child import UNetJob
from vgrt.bench.unet_suite import (
    Key,
    job,
    measurements,
    open_seconds,
    runner_details,
    time_rounds,
    torch_device,
    write_feed,
)
from vgrt.calibration.dataset import CalibrationSet, CapturedRun, read_set
from vgrt.errors import InvalidInputError
from vgrt.export.manifest import read_manifest
from vgrt.export.spec import ComponentSpec
from vgrt.models.features import GATED

log = logging.getLogger(__name__)

TARGET = 1.10  # issue 12: conditioned / plain at most this
_PRECISIONS = {"float32": "fp32", "float16": "fp16"}  # the feeds' dtype -> the export's


@dataclass
class Phase:
    """Captured calls of one feature set with the same sizes and the same gates on; `feed` is the first."""

    features: str
    directory: str  # the conditioned export the feeds go to
    sizes: dict[str, int]
    gates_on: tuple[str, ...]
    feed: dict[str, torch.Tensor]
    calls: dict[str, float] = field(default_factory=dict)  # method -> the run calls its feeds stand for
    samples: int = 0

    @property
    def label(self) -> str:
        return f"{self.features}: {describe_sizes(self.sizes)}; gates {'+'.join(self.gates_on) or 'off'}"


def run_feeds(settings: BenchSettings) -> SuiteOutput:
    calibration = read_set(settings.feeds_dir)
    dtype = _precision(calibration)
    exports, skipped = _conditioned_exports(calibration, settings, dtype)
    plain_dir = settings.plain_export_dir or _cached_export(calibration.model, "none", dtype)
    plain_spec = read_manifest(plain_dir).component("unet").spec
    phases = _phases(calibration, exports)
    plain_case, plain_feeds = {}, {}  # phase label -> its plain case; plain case -> its feed
    for phase in phases:
        feed = _plain_feed(phase, plain_spec)
        plain_case[phase.label] = f"plain: {describe_sizes(plain_spec.sizes(feed))}"
        plain_feeds.setdefault(plain_case[phase.label], feed)
    log.info("%d phases in %s, against %d plain sizes", len(phases), settings.feeds_dir, len(plain_feeds))
    device = torch_device()
    with tempfile.TemporaryDirectory(prefix="vgrt-bench-feeds-") as tmp:
        feeds = {phase.label: (phase.directory, phase.feed) for phase in phases}
        feeds |= {name: (plain_dir, feed) for name, feed in plain_feeds.items()}
        jobs = _jobs(feeds, settings, device, Path(tmp))
        samples, order = time_rounds(jobs, settings.timing.repeats)
        timed = {case: measurements(_of(jobs, case), _of(samples, case)) for case in feeds}
    ratios = {phase.label: _ratios(timed[phase.label], timed[plain_case[phase.label]]) for phase in phases}
    weighted = _weighted(phases, timed, plain_case)
    preset = calibration.model["preset"]
    details = {
        "feeds": str(settings.feeds_dir),
        "torch_device": device,
        **runner_details(settings),
        "conditioned_exports": sorted(set(exports.values())),
        "plain_export": str(plain_dir),
        "runs_left_out": skipped,
        "phases": [_describe(phase, plain_case[phase.label], ratios[phase.label]) for phase in phases],
        "conditioned_over_plain_weighted": weighted,
        "weighting": "sum over phases of calls x median conditioned / sum of calls x median plain",
        "children": {"round_order": order, "open_s": open_seconds(samples)},
    }
    cases = [_case(preset, phase, timed[phase.label]) for phase in phases]
    cases += [_plain_case(preset, name, timed[name], phases, plain_case) for name in dict.fromkeys(plain_case.values())]
    return SuiteOutput(preset, tuple(cases), details, _summary(phases, ratios, weighted, settings.backends))


def describe_sizes(sizes: Mapping[str, int]) -> str:
    """'batch 2, 64x64, context 77', then any other dims by name."""
    rest = [f"{name} {size}" for name, size in sizes.items() if name not in ("batch", "height", "width", "context")]
    main = [f"batch {sizes['batch']}", f"{sizes['height']}x{sizes['width']}", f"context {sizes['context']}"]
    return ", ".join(main + rest)


def gates_on(feed: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The gated features `layer_gates` switches on in any block (none without the input)."""
    gates = feed.get("layer_gates")
    if gates is None:
        return ()
    return tuple(name for column, name in enumerate(GATED) if bool(gates[:, column].any()))


def _precision(calibration: CalibrationSet) -> str:
    dtypes = {run.inputs["sample"]["dtype"] for run in calibration.runs.values()}
    if len(dtypes) != 1 or not dtypes <= set(_PRECISIONS):
        raise InvalidInputError(
            f"the --feeds set {str(calibration.directory)!r} holds feeds in {sorted(dtypes)}; one of "
            f"{', '.join(_PRECISIONS)} is timed at a time: capture the precisions into separate sets"
        )
    return _PRECISIONS[dtypes.pop()]


def _conditioned_exports(
    calibration: CalibrationSet, settings: BenchSettings, dtype: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(run key -> the conditioned export its feeds go to, run key -> why it is left out). Raises when
    no run fits, before anything is timed."""
    runs = list(calibration.runs.values())
    if settings.export_dir is not None:
        directories = {run.key: settings.export_dir for run in runs}
    else:
        made = {f: _cached_export(calibration.model, f, dtype) for f in dict.fromkeys(run.features for run in runs)}
        directories = {run.key: made[run.features] for run in runs}
    exports, skipped = {}, {}
    for run in runs:
        names = {t.name for t in read_manifest(directories[run.key]).component("unet").spec.inputs}
        if set(run.inputs) == names:
            exports[run.key] = directories[run.key]
        else:
            skipped[run.key] = (
                f"{run.method} was captured with the inputs {sorted(run.inputs)}, and {directories[run.key]} takes "
                f"{sorted(names)}"
            )
    if not exports:
        raise InvalidInputError(
            f"no run of the --feeds set {settings.feeds_dir!r} fits its conditioned export: "
            f"{'; '.join(skipped.values())}; give the export of the captured feature set (--export-dir), or "
            "capture the set again with this vgrt"
        )
    for reason in skipped.values():
        log.warning("left out: %s", reason)
    return exports, skipped


def _cached_export(model: Mapping, features: str, dtype: str) -> str:
    """The export cache's UNet of the set's model (as vgrt compose would export it), made in a child
    process when missing, so the exporter's memory stays out of this one."""
    from vgrt.export.cache import cache_root, cached_export
    from vgrt.export.exporter import ExportSettings

    export = ExportSettings(
        preset=model["preset"], features=features, dtype=dtype, seed=model["seed"] or 0, weights=model["weights"]
    )
    directory = run_in_child(cached_export, export, cache_root(), what=f"the {features} export of {model['preset']}")
    return str(directory)


def _phases(calibration: CalibrationSet, exports: Mapping[str, str]) -> list[Phase]:
    """Every captured feed of the runs that fit, in groups of one feature set, sizes and gates."""
    specs: dict[str, ComponentSpec] = {d: read_manifest(d).component("unet").spec for d in set(exports.values())}
    phases: dict[tuple, Phase] = {}
    runs: list[CapturedRun] = [calibration.runs[key] for key in exports]
    for run in runs:
        directory = exports[run.key]
        for feed in calibration.samples([run]):
            sizes, on = specs[directory].sizes(feed), gates_on(feed)
            key = (directory, tuple(sizes.items()), on)
            phase = phases.setdefault(key, Phase(run.features, directory, sizes, on, feed))
            phase.samples += 1
            phase.calls[run.method] = phase.calls.get(run.method, 0.0) + run.calls / run.samples
    return list(phases.values())


def _plain_feed(phase: Phase, plain: ComponentSpec) -> dict[str, torch.Tensor]:
    missing = [t.name for t in plain.inputs if t.name not in phase.feed]
    if missing:
        raise InvalidInputError(
            f"the plain UNet takes {missing}, which the captured feeds of {phase.features} lack; give the plain "
            "export of the set's model (--plain-export-dir)"
        )
    return {t.name: phase.feed[t.name] for t in plain.inputs}


def _jobs(feeds: Mapping[str, tuple], settings: BenchSettings, device: str, tmp: Path) -> dict[Key, UNetJob]:
    """Every case (a phase, or a plain size) on every backend; `feeds` maps each case to its export and feed."""
    jobs = {}
    for index, (case, (directory, feed)) in enumerate(feeds.items()):
        path = write_feed(feed, tmp / f"feed-{index}.safetensors")
        jobs |= {(case, backend): job(backend, directory, path, tmp, settings, device) for backend in settings.backends}
    return jobs


def _of(found: Mapping[Key, object], case: str) -> dict:
    return {key: value for key, value in found.items() if key[0] == case}


def _ratios(conditioned: tuple[Measurement, ...], plain: tuple[Measurement, ...]) -> dict[str, float]:
    """Conditioned / plain median per backend."""
    plain_median = {m.backend: m.median_s for m in plain}
    return {m.backend: m.median_s / plain_median[m.backend] for m in conditioned}


def _weighted(phases: list[Phase], timed: Mapping, plain_case: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per method and for every call ('all'), per backend: sum(calls x conditioned) / sum(calls x plain)."""
    methods = dict.fromkeys(m for phase in phases for m in phase.calls)
    found = {}
    for name in [*methods, "all"]:
        conditioned: dict[str, float] = {}
        plain: dict[str, float] = {}
        for phase in phases:
            calls = sum(phase.calls.values()) if name == "all" else phase.calls.get(name, 0.0)
            plain_median = {m.backend: m.median_s for m in timed[plain_case[phase.label]]}
            for m in timed[phase.label]:
                conditioned[m.backend] = conditioned.get(m.backend, 0.0) + calls * m.median_s
                plain[m.backend] = plain.get(m.backend, 0.0) + calls * plain_median[m.backend]
        found[name] = {backend: conditioned[backend] / plain[backend] for backend in conditioned}
    return found


def _params(phase_sizes: Mapping[str, int], features: str, phase: str, calls: float) -> dict:
    return {
        "unet": "plain" if features == "none" else "conditioned", "features": features,
        "batch": phase_sizes["batch"], "latent": f"{phase_sizes['height']}x{phase_sizes['width']}",
        "phase": phase, "calls": round(calls, 1),
    }  # fmt: skip


def _case(preset: str, phase: Phase, timed: tuple[Measurement, ...]) -> Case:
    gates = "+".join(phase.gates_on) or "off"
    params = _params(phase.sizes, phase.features, f"gates {gates}", sum(phase.calls.values()))
    return Case(f"{preset} conditioned UNet, captured feeds", phase.label, params, timed)


def _plain_case(preset: str, name: str, timed, phases: list[Phase], plain_case: Mapping[str, str]) -> Case:
    users = [phase for phase in phases if plain_case[phase.label] == name]
    calls = sum(sum(phase.calls.values()) for phase in users)
    params = _params(users[0].sizes, "none", "-", calls)
    return Case(f"{preset} plain UNet, the same batch and sizes", name, params, timed)


def _describe(phase: Phase, plain: str, ratios: Mapping[str, float]) -> dict:
    return {
        "label": phase.label, "features": phase.features, "export": phase.directory, "sizes": phase.sizes,
        "gates_on": list(phase.gates_on), "samples": phase.samples, "calls": phase.calls, "plain": plain,
        "conditioned_over_plain": dict(ratios),
    }  # fmt: skip


def _summary(phases: list[Phase], ratios: Mapping, weighted: Mapping, backends: tuple[str, ...]) -> str:
    """Markdown: conditioned / plain per phase and backend, then weighted per method and for all calls."""
    header = ["conditioned / plain", "calls", *backends]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def row(name: str, calls: float, found: Mapping[str, float]) -> None:
        cells = [f"{found[b]:.2f}x" + (" (!)" if found[b] > TARGET else "") for b in backends]
        lines.append("| " + " | ".join([name, f"{calls:g}", *cells]) + " |")

    for phase in phases:
        row(phase.label, round(sum(phase.calls.values()), 1), ratios[phase.label])
    for name, found in weighted.items():
        calls = sum(sum(p.calls.values()) if name == "all" else p.calls.get(name, 0.0) for p in phases)
        row(f"{'every call' if name == 'all' else name}, weighted by calls", round(calls, 1), found)
    return f"Conditioned over plain UNet on the captured feeds ((!): above the {TARGET:.2f}x target):\n\n" + "\n".join(
        lines
    )
