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
"""

import dataclasses
import gc
import logging
import statistics
import time
from typing import Any

import torch

from vgrt.bench.backends import BASELINE
from vgrt.bench.compose_child import STEPS as WARMUP_STEPS
from vgrt.bench.compose_child import prepare_in_child
from vgrt.bench.compose_methods import Compose, bench_request, example_images, gradient_steps
from vgrt.bench.machine import peak_rss_window
from vgrt.bench.results import Case, Measurement, SuiteOutput, UNetWork
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import rotated
from vgrt.bench.unet_calls import StageCalls, UNetCallLog
from vgrt.engines import thread_settings
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
}


@dataclasses.dataclass(frozen=True)
class RunRecord:
    seconds: float  # the whole compose() call
    stages: dict[str, float]  # seconds per stage, as the method reports them
    unet: dict[str, StageCalls]  # UNet calls and own seconds per stage


@dataclasses.dataclass
class BackendRuns:
    """One backend's timed runs of one method, its final latents and its peak memory over its turns."""

    records: list[RunRecord] = dataclasses.field(default_factory=list)
    latents: torch.Tensor | None = None
    peak_rss_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """What one method is timed on: its compose function, the request, the shorter warm-up request."""

    method: str
    size: int
    compose: Compose
    request: Any
    warmup: Any


def run(settings: BenchSettings) -> SuiteOutput:
    cases, methods, prepared, gradients = [], {}, {}, {}
    for preset in settings.presets:
        model = get_preset(preset)
        sizes = [latent * model.vae_factor for latent in settings.latents or (model.profile.latent.opt,)]
        work = Work(settings.steps, settings.gradient_steps)
        planned = [_plan(method, model, size, work) for size in sizes for method in settings.methods]
        backend = _preparing_backend(settings.backends)
        for method in settings.methods:
            log.info("preparing the engines of %s on %s (%s)", method, preset, backend)
            prepared[f"{method} {preset}"] = prepare_in_child(preset, backend, method)
        for plan in planned:
            runs = _time_rounds(preset, plan, settings)
            params = {"preset": preset, "method": plan.method, "image": f"{plan.size}x{plan.size}"}
            cases += _cases({**params, "steps": settings.steps}, runs)
            key = f"{plan.method} {preset} {plan.size}x{plan.size}"
            methods[key] = {"request": _describe(plan.request), "latents_vs_torch": _relative_errors(runs)}
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
    }
    return SuiteOutput("+".join(settings.presets), tuple(cases), details)


def _preparing_backend(competitors: tuple[str, ...]) -> str:
    """The backend whose first-use work the preparing child does: exports for ONNX Runtime and OpenVINO
    alike (OpenVINO also compiles into its cache), none for PyTorch alone."""
    backends = {COMPETITORS[c][0] for c in competitors}
    return next((b for b in ("openvino", "onnxruntime") if b in backends), "torch")


def _plan(method: str, model: Any, size: int, work: Work) -> MethodCase:
    """The method's requests at `size`, validated before any engine is exported or opened. The warm-up
    takes fewer sampling steps and one gradient step: the same shapes, so every first call is paid."""
    with example_images(model, size) as examples:
        compose, request = bench_request(method, examples, work)
        _, warmup = bench_request(method, examples, Work(min(work.steps, WARMUP_STEPS), gradient_steps=1))
    return MethodCase(method, size, compose, request, warmup)


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
    composer = Composer.from_preset(
        preset, backend=backend, progress=False, runner_options=options, runner_hook=calls.hook
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
    runs.latents = result.latents
    runs.peak_rss_bytes = max(runs.peak_rss_bytes, peak.get("peak_rss_bytes", 0))


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
    """The whole compose() calls, the final latents' largest difference from the baseline's, peak memory."""
    diff = None if backend == BASELINE else (runs.latents.float() - reference.float()).abs().max().item()
    peak = (runs.peak_rss_bytes,) if runs.peak_rss_bytes else ()
    seconds = tuple(record.seconds for record in runs.records)
    return Measurement(backend, backend, seconds, max_abs_diff=diff, peak_rss_bytes=peak)


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
