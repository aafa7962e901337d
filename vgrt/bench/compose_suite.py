"""Compose suite: each method end to end on synthetic inputs, per backend, with its stages and host work.

Runs go in interleaved rounds, as in the other suites, so drift over the run (this machine's timings
drift, and other processes come and go) is spread over every backend: in round r each backend in turn,
the first one rotating. Only one Composer is open at a time: two SD 1.5 composers at once reached 20 GB
(LocRef), and MCA-Ctrl's batch of six rows needs more. So in its turn a backend's composer opens, warms
up (untimed runs of the same request at WARMUP_STEPS steps: the same shapes, so every allocation and
first call is paid), runs the request once timed, and closes. Before any of this, a child process per
method runs it for a few steps (compose_child), so the engines are exported and only opened here.

Each run records the seconds of every stage the method reports (encode, invert, denoise, decode; a
gradient stage such as 'pno' or 'guidance' where a method has one) and, through a timing wrapper on the
UNet runners, the seconds inside the UNet's backend calls of each stage. A gradient stage runs in
PyTorch whatever the backend: its seconds per gradient step and its share of the whole call (the rest
is the backend's, host glue included) are reported per backend. Host work per step of a stage =
(the stage's own seconds - seconds inside its UNet calls) / UNet calls, with one UNet call per step
(guidance is batched into it); own seconds leave out any stage timed inside it, such as gradient steps
in the denoising loop. It is reported as a share of one UNet call.

Beside the speed, each competitor's quality against PyTorch eager: its final latents' relative difference
and its decoded final image's PSNR. The int8 competitors (vgrt.bench.compose_int8) run each method with
the INT8 UNets calibrated on it (--calibrated); the JSON names the folders that ran and their held-out error.
"""

import dataclasses
import gc
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vgrt.bench.backends import BASELINE
from vgrt.bench.compose_child import STEPS as WARMUP_STEPS
from vgrt.bench.compose_child import prepare_in_child
from vgrt.bench.compose_int8 import INT8_COMPETITORS, CalibratedUNet, calibrated_per_method, composer_options
from vgrt.bench.compose_methods import Compose, bench_request, example_images, gradient_steps
from vgrt.bench.machine import peak_rss_window
from vgrt.bench.results import Case, Measurement, SuiteOutput, UNetWork
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import rotated
from vgrt.bench.unet_calls import StageCalls, UNetCallLog
from vgrt.calibration.quality import psnr_db
from vgrt.engines import thread_settings
from vgrt.engines.base import Runner
from vgrt.errors import VgrtError
from vgrt.models.presets import get_preset
from vgrt.runtime.composer import Composer
from vgrt.runtime.methods.registry import Work

log = logging.getLogger(__name__)

TOTAL = "total"  # the whole compose() call, stages and the host work between them
# competitor -> the backend of its composer and that backend's runner settings besides threads
COMPETITORS = {
    "torch": ("torch", {}),
    "onnxruntime": ("onnxruntime", {}),
    "openvino": ("openvino", {"precision": "fp32"}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
    **{competitor: (backend, {}) for competitor, backend in INT8_COMPETITORS.items()},  # OpenVINO: int8 kernels
}
PSNR_SCALE = (
    "decoded images in [-1, 1], peak-to-peak 2: the figure of [0, 1] images with peak 1; null (JSON) when identical"
)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    seconds: float  # the whole compose() call
    stages: dict[str, float]  # seconds per stage, as the method reports them
    unet: dict[str, StageCalls]  # UNet calls and own seconds per stage


@dataclasses.dataclass
class BackendRuns:
    """One backend's timed runs of one method, its final latents and image, its peak memory over its turns,
    and the export folders of the UNets it opened (runners of ONNX Runtime and OpenVINO)."""

    records: list[RunRecord] = dataclasses.field(default_factory=list)
    latents: torch.Tensor | None = None
    image: torch.Tensor | None = None
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0  # of which anonymous (not mapped files' pages)
    unet_folders: set[Path] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """What one method is timed on: its compose function, the request, the shorter warm-up request, and the
    INT8 UNets its int8 competitors run."""

    method: str
    size: int
    compose: Compose
    request: Any
    warmup: Any
    calibrated: tuple[CalibratedUNet, ...] = ()


def run(settings: BenchSettings) -> SuiteOutput:
    cases, methods, prepared, gradients = [], {}, {}, {}
    calibrated = calibrated_per_method(settings.methods, settings.presets, settings.backends, settings.calibrated)
    for preset in settings.presets:
        model = get_preset(preset)
        sizes = [latent * model.vae_factor for latent in settings.latents or (model.profile.latent.opt,)]
        work = Work(settings.steps, settings.gradient_steps)
        planned = [
            _plan(method, model, size, work, calibrated.get((method, preset), ()))
            for size in sizes
            for method in settings.methods
        ]
        prepared.update(_prepare(preset, settings, calibrated))
        for plan in planned:
            runs = _time_rounds(preset, plan, settings)
            params = {"preset": preset, "method": plan.method, "image": f"{plan.size}x{plan.size}"}
            cases += _cases({**params, "steps": settings.steps}, runs)
            key = f"{plan.method} {preset} {plan.size}x{plan.size}"
            methods[key] = {
                "request": _describe(plan.request),
                "latents_vs_torch": _relative_errors(runs),
                "image_psnr_db_vs_torch": _image_psnrs(runs),
                **({"int8": _int8_record(plan, runs)} if plan.calibrated else {}),
            }
            steps = gradient_steps(plan.request)
            if steps:
                gradients[key] = _gradient_shares(steps, runs)
    details = {
        "methods": methods,
        "prepared_in_child_s": prepared,
        "rounds": "per round, each backend in turn (the first rotating) with only its composer open: "
        f"opened, warmed up with the request at {WARMUP_STEPS} steps (untimed), one timed run, closed",
        "settings": {
            competitor: {**COMPETITORS[competitor][1], **thread_settings(COMPETITORS[competitor][0], settings.threads)}
            for competitor in settings.backends
        },
        "other settings": "the Composer's and runners' defaults (OpenVINO: the first call's shapes static)",
        "host_overhead": "per stage with UNet calls: (the stage's own seconds, less stages timed inside it, "
        "- seconds inside the UNet runner's backend calls) / calls; one call per step",
        "gradient": gradients,
        "image_psnr": PSNR_SCALE,
    }
    return SuiteOutput("+".join(settings.presets), tuple(cases), details, _quality_summary(methods))


def _prepare(
    preset: str, settings: BenchSettings, calibrated: dict[tuple[str, str], tuple[CalibratedUNet, ...]]
) -> dict[str, float]:
    """Each method's engines made in a child, its seconds per method: once for the float competitors, and
    once more with the method's INT8 UNets where int8 competitors run them."""
    prepared = {}
    floats = _preparing_backend([c for c in settings.backends if c not in INT8_COMPETITORS])
    int8 = _preparing_backend([c for c in settings.backends if c in INT8_COMPETITORS])
    for method in settings.methods:
        log.info("preparing the engines of %s on %s (%s)", method, preset, floats)
        prepared[f"{method} {preset}"] = prepare_in_child(preset, floats, method)
        unets = calibrated.get((method, preset), ())
        if unets:
            log.info("preparing the engines of %s on %s (%s, int8)", method, preset, int8)
            prepared[f"{method} {preset} int8"] = prepare_in_child(preset, int8, method, tuple(u.folder for u in unets))
    return prepared


def _preparing_backend(competitors: list[str]) -> str:
    """The backend whose first-use work the preparing child does: exports for ONNX Runtime and OpenVINO
    alike (OpenVINO also compiles into its cache), none for PyTorch alone."""
    backends = {COMPETITORS[c][0] for c in competitors}
    return next((b for b in ("openvino", "onnxruntime") if b in backends), "torch")


def _plan(method: str, model: Any, size: int, work: Work, calibrated: tuple[CalibratedUNet, ...]) -> MethodCase:
    """The method's requests at `size`, validated before any engine is exported or opened. The warm-up
    takes fewer sampling steps and one gradient step: the same shapes, so every first call is paid."""
    with example_images(model, size) as examples:
        compose, request = bench_request(method, examples, work)
        _, warmup = bench_request(method, examples, Work(min(work.steps, WARMUP_STEPS), gradient_steps=1))
    return MethodCase(method, size, compose, request, warmup, calibrated)


def _time_rounds(preset: str, plan: MethodCase, settings: BenchSettings) -> dict[str, BackendRuns]:
    runs = {backend: BackendRuns() for backend in settings.backends}
    for round_index in range(settings.timing.repeats):
        for backend in rotated(settings.backends, round_index):
            log.info(
                "%s on %s, %dx%d, %d steps: round %d of %d, %s", plan.method, preset, plan.size, plan.size,
                settings.steps, round_index + 1, settings.timing.repeats, backend,
            )  # fmt: skip
            _turn(preset, backend, plan, settings, runs[backend])
            gc.collect()  # the closed composer's engines go before the next one opens
    return runs


def _turn(preset: str, competitor: str, plan: MethodCase, settings: BenchSettings, runs: BackendRuns) -> None:
    """Open the competitor's composer, warm it up, time one run, close it."""
    calls = UNetCallLog()
    backend, options = COMPETITORS[competitor]
    options = {**options, **thread_settings(backend, settings.threads)}
    int8 = composer_options(backend, [u.folder for u in plan.calibrated]) if competitor in INT8_COMPETITORS else {}

    def hook(component: str, runner: Runner) -> Runner:
        if component == "unet" and hasattr(runner, "path"):  # the export file an ONNX Runtime or OpenVINO runner reads
            runs.unet_folders.add(Path(runner.path).parent.resolve())
        return calls.hook(component, runner)

    composer = Composer.from_preset(
        preset, backend=backend, progress=False, runner_options=options, runner_hook=hook, **int8
    )
    with peak_rss_window() as peak, composer:
        for _ in range(settings.timing.warmup):
            plan.compose(composer, plan.warmup)
        calls.calls.clear()
        gc.collect()
        gc.disable()  # a collection inside the timed run would be charged to whichever stage ran then
        try:
            started = time.perf_counter()
            result = plan.compose(composer, plan.request)
            seconds = time.perf_counter() - started
        finally:
            gc.enable()
    runs.records.append(RunRecord(seconds, dict(result.times.seconds), calls.by_stage(result.times.spans)))
    runs.latents, runs.image = result.latents, result.image
    runs.peak_rss_bytes = max(runs.peak_rss_bytes, peak.get("peak_rss_bytes", 0))
    runs.peak_anon_bytes = max(runs.peak_anon_bytes, peak.get("peak_anon_bytes", 0))
    if int8 and not _calibrated_ran(plan, runs):
        given = ", ".join(str(u.folder) for u in plan.calibrated)
        raise VgrtError(
            f"{competitor} ran {plan.method} without its INT8 UNets ({given}), so its times would be fp32's under an "
            f"int8 name; the UNets it opened came from {', '.join(map(str, sorted(runs.unet_folders)))}"
        )


def _cases(params: dict[str, Any], runs: dict[str, BackendRuns]) -> list[Case]:
    """One case per stage (in the order the stages ran), then the whole call, with the largest difference
    of each backend's final latents from PyTorch eager's."""
    stages = dict.fromkeys(stage for r in runs.values() for record in r.records for stage in record.stages)
    group = f"{params['method']} on {params['preset']}, {params['image']}, {params['steps']} steps"
    cases = []
    for stage in stages:
        measurements = tuple(_stage_measurement(backend, r.records, stage) for backend, r in runs.items())
        cases.append(Case(group, stage, {**params, "stage": stage}, measurements))
    reference = runs[BASELINE].latents
    totals = tuple(_total(backend, r, reference) for backend, r in runs.items())
    cases.append(Case(group, TOTAL, {**params, "stage": TOTAL}, totals))
    return cases


def _total(backend: str, runs: BackendRuns, reference: torch.Tensor) -> Measurement:
    """The whole compose() calls, the final latents' largest difference from the baseline's, peak memory
    (resident, and its anonymous part)."""
    diff = None if backend == BASELINE else (runs.latents.float() - reference.float()).abs().max().item()
    peak = (runs.peak_rss_bytes,) if runs.peak_rss_bytes else ()
    anon = (runs.peak_anon_bytes,) if runs.peak_anon_bytes else ()
    seconds = tuple(record.seconds for record in runs.records)
    return Measurement(backend, backend, seconds, max_abs_diff=diff, peak_rss_bytes=peak, peak_anon_bytes=anon)


def _stage_measurement(backend: str, records: list[RunRecord], stage: str) -> Measurement:
    samples = tuple(record.stages[stage] for record in records)
    work = [record.unet.get(stage, StageCalls()) for record in records]
    counts = {w.calls for w in work}
    if len(counts) != 1:
        raise VgrtError(f"the {stage} stage made {sorted(counts)} UNet calls in different runs of one request")
    (calls,) = counts
    unet = None
    if calls:
        unet = UNetWork(calls, tuple(w.seconds for w in work), tuple(w.own_seconds for w in work))
    return Measurement(backend, backend, samples, unet=unet)


def _relative_errors(runs: dict[str, BackendRuns]) -> dict[str, float]:
    """Each backend's final latents against PyTorch eager's: ||ours - torch|| / ||torch||, which reads
    the same on every preset where the largest absolute difference depends on the latents' scale."""
    reference = runs[BASELINE].latents.float()
    return {
        backend: ((r.latents.float() - reference).norm() / reference.norm()).item()
        for backend, r in runs.items()
        if backend != BASELINE
    }


def _image_psnrs(runs: dict[str, BackendRuns]) -> dict[str, float | None]:
    """Each backend's decoded final image against PyTorch eager's: PSNR in dB (PSNR_SCALE); None when the
    images are identical (JSON has no infinity)."""
    reference = runs[BASELINE].image
    psnrs = {backend: psnr_db(r.image, reference) for backend, r in runs.items() if backend != BASELINE}
    return {backend: None if math.isinf(psnr) else psnr for backend, psnr in psnrs.items()}


def _calibrated_ran(plan: MethodCase, runs: BackendRuns) -> list[CalibratedUNet]:
    """The method's INT8 UNets among the UNet exports the competitor opened."""
    return [u for u in plan.calibrated if u.folder.resolve() in runs.unet_folders]


def _int8_record(plan: MethodCase, runs: dict[str, BackendRuns]) -> dict[str, list[dict[str, Any]]]:
    """Per int8 competitor: the INT8 UNets that ran, with the calibration's methods and held-out error."""
    return {
        competitor: [u.describe() for u in _calibrated_ran(plan, r)]
        for competitor, r in runs.items()
        if competitor in INT8_COMPETITORS
    }


def _quality_summary(methods: dict[str, dict[str, Any]]) -> str:
    """Markdown: per method and competitor, the final latents' relative error and image PSNR against PyTorch
    eager, and for an int8 competitor its INT8 UNets with their held-out error."""
    rows = []
    for key, found in methods.items():
        for competitor, error in found["latents_vs_torch"].items():
            unets = found.get("int8", {}).get(competitor, [])
            int8 = "; ".join(f"{u['folder']} ({_held_out(u)})" for u in unets) or "-"
            psnr = found["image_psnr_db_vs_torch"][competitor]
            shown = "identical" if psnr is None else f"{psnr:.1f} dB"
            rows.append(f"| {key} | {competitor} | {error:.1e} | {shown} | {int8} |")
    if not rows:  # PyTorch eager alone
        return ""
    header = [
        f"Quality against PyTorch eager (image PSNR: {PSNR_SCALE}):",
        "",
        "| method | competitor | latents rel. error | image PSNR | INT8 UNet (held-out rel. error) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def _held_out(unet: dict[str, Any]) -> str:
    error = unet["held_out_relative_error"]
    return "held-out error not recorded" if error is None else f"{error:.1e}"


def _gradient_shares(steps: dict[str, int], runs: dict[str, BackendRuns]) -> dict[str, dict[str, Any]]:
    """Per backend and gradient stage: its steps, seconds per step and share of the whole call, per run
    and as medians (the share left to the backend, host glue included, is 1 - the PyTorch share)."""
    shares = {}
    for backend, backend_runs in runs.items():
        shares[backend] = {}
        for stage, count in steps.items():
            per_step = [record.stages[stage] / count for record in backend_runs.records]
            share = [record.stages[stage] / record.seconds for record in backend_runs.records]
            shares[backend][stage] = {
                "steps": count,
                "seconds_per_step": per_step,
                "seconds_per_step_median": statistics.median(per_step),
                "pytorch_share_of_total": share,
                "pytorch_share_of_total_median": statistics.median(share),
            }
            log.info(
                "%s %s: %.3f s per step, PyTorch %.0f%% of the whole call", backend, stage,
                statistics.median(per_step), 100 * statistics.median(share),
            )  # fmt: skip
    return shares


def _describe(request: Any) -> dict[str, Any]:
    """The request's settings, tensors given by their shape, nested settings (PNO's) as dicts."""
    described = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if isinstance(value, torch.Tensor):
            value = list(value.shape)
        elif isinstance(value, tuple):
            value = [list(v.shape) if isinstance(v, torch.Tensor) else str(v) for v in value]
        elif dataclasses.is_dataclass(value):
            value = _describe(value)
        described[field.name] = value
    return described
