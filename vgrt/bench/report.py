"""A finished run as files (JSON with every sample, PNG plot) and as a markdown table for the terminal."""

import json
from datetime import datetime
from pathlib import Path

from vgrt.bench.plot import plot_run
from vgrt.bench.results import BenchRun, Measurement


def write_run(run: BenchRun, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<suite>-<presets>-<UTC time>.json` and `.png` into `out_dir`; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(run.created).strftime("%Y%m%dT%H%M%SZ")
    stem = out_dir / f"{run.settings.suite}-{run.output.label}-{stamp}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(run.to_json(), indent=1) + "\n")
    plot_run(run, png_path)
    return json_path, png_path


def markdown_table(run: BenchRun) -> str:
    """One row per case and competitor: the case's parameters, median, p90, ratio to PyTorch eager;
    relative error, peak memory and the host work per UNet step where a suite measured them; then the
    suite's summary, if it wrote one."""
    cases = run.output.cases
    params = list(dict.fromkeys(key for case in cases for key in case.params))
    header = [*params, "competitor", "median", "p90", "vs torch", "max |diff|"]
    with_relative = any(m.relative_error is not None for case in cases for m in case.measurements)
    header += ["rel. error"] if with_relative else []
    with_memory = any(m.peak_rss_bytes for case in cases for m in case.measurements)
    header += ["peak RSS"] if with_memory else []
    with_host = any(m.unet is not None for case in cases for m in case.measurements)
    header += ["UNet call", "host / step", "host % of UNet call"] if with_host else []
    rows = []
    for case in cases:
        for m in case.measurements:
            ratio = case.ratio(m)
            rows.append([
                *(str(case.params.get(key, "")) for key in params),
                m.competitor,
                format_seconds(m.median_s),
                format_seconds(m.p90_s),
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if m.max_abs_diff is None else f"{m.max_abs_diff:.1e}",
                *([_relative(m)] if with_relative else []),
                *([_peak(m)] if with_memory else []),
                *(_host_columns(m) if with_host else []),
            ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    table = "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    return f"{table}\n\n{run.output.summary}" if run.output.summary else table


def _relative(m: Measurement) -> str:
    return "-" if m.relative_error is None else f"{m.relative_error:.1e}"


def _peak(m: Measurement) -> str:
    """'18.20 GiB', with its anonymous part where measured: '18.20 GiB (9.10 anon)'."""
    if not m.peak_rss_bytes:
        return "-"
    anon = f" ({max(m.peak_anon_bytes) / 2**30:.2f} anon)" if m.peak_anon_bytes else ""
    return f"{max(m.peak_rss_bytes) / 2**30:.2f} GiB{anon}"


def _host_columns(m: Measurement) -> list[str]:
    """Medians over the samples: one UNet call, the host seconds per step, their ratio in percent."""
    if m.unet is None:
        return ["-", "-", "-"]
    host = m.host_overhead()
    return [
        format_seconds(host["unet_call_median_s"]),
        format_seconds(host["host_per_step_median_s"]),
        f"{host['host_percent_of_unet_call_median']:.2f}%",
    ]


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"
