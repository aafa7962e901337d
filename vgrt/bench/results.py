"""What a benchmark run produced: every sample per competitor and case, the summary statistics, and the
JSON form that is checked in under bench/results/."""

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vgrt.bench.settings import BenchSettings


@dataclass(frozen=True)
class UNetWork:
    """What a composition stage spent in UNet calls, per sample of that stage (the compose suite).

    unet_calls: UNet calls per sample (one per step: guidance is batched into the call).
    unet_s: seconds inside those calls, per sample.
    own_s: the stage's own seconds per sample, less any stage timed inside it (gradient steps inside
        the denoising loop): own_s - unet_s is the stage's host work.
    """

    unet_calls: int
    unet_s: tuple[float, ...]
    own_s: tuple[float, ...]


@dataclass(frozen=True)
class Measurement:
    """The timed calls of one competitor in one case.

    max_abs_diff: largest |output - baseline output| on the same inputs, proof that the competitors
        computed the same thing (None for the baseline itself, or where there is no output).
    peak_rss_bytes: peak resident memory: per sample where each sample ran in a process of its own (the
        export, unet and peer suites), or one value for all samples (the compose suite: while the backend's
        composer was open).
    peak_anon_bytes: the anonymous part of that peak (not pages of mapped files, which the kernel can drop
        and read again), where measured (the compose suite).
    unet: for a composition stage that calls the UNet, the calls and their seconds; the rest of the
        stage's time is host work.
    relative_error: ||output - baseline output|| / ||baseline output||, which reads the same whatever the
        output's scale (None where not measured).
    """

    competitor: str
    backend: str
    samples_s: tuple[float, ...]
    max_abs_diff: float | None = None
    peak_rss_bytes: tuple[int, ...] = ()
    peak_anon_bytes: tuple[int, ...] = ()
    unet: UNetWork | None = None
    relative_error: float | None = None

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.samples_s, 90))

    def host_overhead(self) -> dict[str, Any]:
        """Host seconds per step (the stage's own seconds outside its UNet calls, per call) and that as a
        percentage of one UNet call: per sample and their medians."""
        work = self.unet
        host = [own - unet for own, unet in zip(work.own_s, work.unet_s)]
        per_call = [u / work.unet_calls for u in work.unet_s]
        per_step = [h / work.unet_calls for h in host]
        percent = [100 * h / u for h, u in zip(host, work.unet_s)]
        return {
            "unet_calls": work.unet_calls,
            "unet_s": list(work.unet_s),
            "stage_own_s": list(work.own_s),
            "unet_call_median_s": float(np.median(per_call)),
            "host_per_step_s": per_step,
            "host_per_step_median_s": float(np.median(per_step)),
            "host_percent_of_unet_call": percent,
            "host_percent_of_unet_call_median": float(np.median(percent)),
        }


@dataclass(frozen=True)
class Case:
    """One configuration (sizes, features, precision) with every competitor timed in the same run.

    group and label place the case in the plot: one panel per group, one tick per label.
    """

    group: str
    label: str
    params: dict[str, Any]
    measurements: tuple[Measurement, ...]
    baseline: str | None = "torch"

    def ratio(self, measurement: Measurement) -> float | None:
        """Median time over the baseline's median time (< 1: faster than PyTorch eager)."""
        base = next((m for m in self.measurements if m.competitor == self.baseline), None)
        return None if base is None else measurement.median_s / base.median_s

    def to_json(self) -> dict[str, Any]:
        results = []
        for m in self.measurements:
            entry = {
                "competitor": m.competitor,
                "backend": m.backend,
                "median_s": m.median_s,
                "p90_s": m.p90_s,
                "ratio_to_torch": self.ratio(m),
                "max_abs_diff": m.max_abs_diff,
                "samples_s": list(m.samples_s),
            }
            if m.relative_error is not None:
                entry["relative_error"] = m.relative_error
            if m.peak_rss_bytes:
                entry["peak_rss_bytes"] = list(m.peak_rss_bytes)
            if m.peak_anon_bytes:
                entry["peak_anon_bytes"] = list(m.peak_anon_bytes)
            if m.unet is not None:
                entry["host_overhead"] = m.host_overhead()
            results.append(entry)
        return {
            "group": self.group,
            "label": self.label,
            "params": self.params,
            "baseline": self.baseline,
            "results": results,
        }


@dataclass(frozen=True)
class SuiteOutput:
    """What a suite returns. label names what was measured (presets) in file names; details keeps
    suite-specific facts worth reading later (device, runner settings, exports made); summary is markdown
    printed below the table (figures computed across cases, such as the unet suite's conditioned / plain)."""

    label: str
    cases: tuple[Case, ...]
    details: dict[str, Any]
    summary: str = ""


@dataclass(frozen=True)
class BenchRun:
    """A finished run with its context: the machine, library versions and the process's peak memory."""

    settings: BenchSettings
    output: SuiteOutput
    machine: dict[str, Any]
    versions: dict[str, str]
    memory: dict[str, int]
    created: str  # UTC, ISO 8601

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.settings.suite,
            "label": self.output.label,
            "created": self.created,
            "machine": self.machine,
            "versions": self.versions,
            "settings": asdict(self.settings),
            "details": self.output.details,
            "memory": self.memory,
            "cases": [c.to_json() for c in self.output.cases],
        }
