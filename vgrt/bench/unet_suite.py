"""UNet suite: one UNet call per backend, per preset, feature set, precision, batch and latent size; or,
with --feeds, the conditioned UNet against the plain one on a calibration set's captured feeds
(vgrt.bench.unet_feeds).

Why child processes: every backend holds its own copy of the model and its compiled form, and on SD 1.5
PyTorch, OpenVINO fp32 and OpenVINO bf16 open at once peaked at 17.9 GB with the plain UNet and over
26 GB with the mutual one (the machine has 24 GB). So each competitor's turn is a child process of its
own (vgrt.bench.child, vgrt.bench.unet_child) and only one engine is in memory at a time: the child
opens the runner, makes the warm-up calls, times one call, writes its output and exits. The turns go in
interleaved rounds, as in the compose and peer suites: in round r each competitor in turn, the first one
rotating, so the machine's drift over minutes is spread over every backend. Each round gives every
competitor one sample.

What is timed: the one call after the warm-up, nothing else. Not timed: starting the child, opening the
runner (reported as open_s; it includes OpenVINO's compile on a cold cache and a TensorRT engine build),
the warm-up calls, reading the feed and writing the output. Every child reads the same feed, written
once by this process (seeded), so outputs are comparable: each competitor's is compared with PyTorch
eager's (max |diff| and relative error). Each child's peak resident memory (opening, warm-up and the
timed call together) is recorded next to its sample; the children are forked from a server that imported
torch, diffusers and the runtimes once, and what those imports hold alone is in the details
(child_baseline_rss_bytes).

Each (preset, features, dtype) is exported once, in a child process, into a temporary directory, or
taken from --export-dir; --quantised gives the INT8 export the *-int8 competitors time.
"""

import itertools
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from vgrt.bench.backends import BASELINE
from vgrt.bench.child import baseline_rss_bytes, run_in_child
from vgrt.bench.export_child import export_in_child
from vgrt.bench.results import Case, Measurement, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import rotated
from vgrt.bench.unet_child import ChildSample, UNetJob, time_unet_call
from vgrt.export.exporter import ExportSettings
from vgrt.export.feeds import random_feed
from vgrt.export.manifest import read_manifest
from vgrt.models.features import features_text
from vgrt.models.presets import get_preset

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (case, backend): one competitor of one case


def run(settings: BenchSettings) -> SuiteOutput:
    if settings.feeds_dir is not None:
        from vgrt.bench.unet_feeds import run_feeds

        return run_feeds(settings)
    device = torch_device()
    cases, exports, orders, opened = [], [], {}, {}
    with tempfile.TemporaryDirectory(prefix="vgrt-bench-unet-") as tmp:
        for preset, features, dtype in itertools.product(settings.presets, settings.features, settings.dtypes):
            export_settings = ExportSettings(preset=preset, features=features, dtype=dtype)
            with _exported(export_settings, settings.export_dir) as (directory, made):
                exports.append(made)
                for case, samples, order in _time_sizes(directory, settings, device, Path(tmp)):
                    cases.append(case)
                    orders[f"{case.group}, {case.label}"] = order
                    opened |= open_seconds(samples)
    children = {"round_order": orders, "open_s": opened}
    details = {"torch_device": device, **runner_details(settings), "exports": exports, "children": children}
    return SuiteOutput("+".join(settings.presets), tuple(cases), details)


def torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def runner_details(settings: BenchSettings) -> dict:
    return {
        "child_baseline_rss_bytes": baseline_rss_bytes(),
        "threads": settings.threads,
        "runners": "as vgrt compose opens them; ONNX Runtime and OpenVINO reuse their output buffers",
        "rounds": "per round each competitor in turn (the first rotating), each turn a child process of its own: "
        f"runner opened, {settings.timing.warmup} untimed warm-up call(s), one timed call",
    }


@contextmanager
def _exported(export_settings: ExportSettings, export_dir: str | None) -> Iterator[tuple[Path, dict]]:
    """An export directory for `export_settings` and a record of how it was made."""
    if export_dir is not None:
        manifest = read_manifest(export_dir)
        yield Path(export_dir), {"reused": export_dir, "preset": manifest.data["preset"], **manifest.data["settings"]}
        return
    with tempfile.TemporaryDirectory(prefix="vgrt-bench-unet-") as tmp:
        log.info(
            "exporting %s (features %s, %s)", export_settings.preset, export_settings.features, export_settings.dtype
        )
        sample = export_in_child(Path(tmp) / "unet", export_settings)
        made = {**asdict(export_settings), "seconds": sample.seconds, "peak_rss_bytes": sample.peak_rss_bytes}
        yield Path(tmp) / "unet", made


def _time_sizes(directory: Path, settings: BenchSettings, device: str, tmp: Path) -> list[tuple]:
    """(case, samples, round order) per batch and latent size of the export."""
    manifest = read_manifest(directory)
    unet = manifest.component("unet")
    preset, dtype = manifest.data["preset"], manifest.data["settings"]["dtype"]
    features = features_text(frozenset(unet.features))
    profile = get_preset(preset).profile
    sizes = itertools.product(settings.batches or (profile.batch.opt,), settings.latents or (profile.latent.opt,))
    done = []
    for batch, latent in sizes:
        latents = f"{latent}x{latent}"
        name = f"{preset} {features} {dtype}, batch {batch}, {latents}"
        feed = random_feed(
            unet.spec, {**unet.spec.profile_sizes("opt"), "batch": batch, "height": latent, "width": latent}
        )
        feed_file = write_feed(feed, tmp / "feed.safetensors")
        jobs = {
            (name, backend): job(backend, settings.quantised_dir if "int8" in backend else directory, feed_file,
                                 tmp, settings, device)
            for backend in settings.backends
        }  # fmt: skip
        samples, order = time_rounds(jobs, settings.timing.repeats)
        params = {"preset": preset, "batch": batch, "latent": latents, "features": features, "dtype": dtype}
        case = Case(f"{preset} {features} {dtype}", f"batch {batch}, {latents}", params, measurements(jobs, samples))
        done.append((case, samples, order))
    return done


def write_feed(feed: Mapping[str, torch.Tensor], path: Path) -> str:
    """Save `feed` for the children to read; returns the path as text."""
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in feed.items()}, path)
    return str(path)


def job(backend: str, directory: str | Path, feed: str, tmp: Path, settings: BenchSettings, device: str) -> UNetJob:
    """The turn of `backend` on an export, with the output file named after the feed and the backend."""
    output = tmp / f"{Path(feed).stem}-{backend}-out.safetensors"
    return UNetJob(backend, str(directory), feed, str(output), settings.threads, device, settings.timing.warmup)


def time_rounds(jobs: Mapping[Key, UNetJob], rounds: int) -> tuple[dict[Key, list[ChildSample]], list[list[str]]]:
    """Every job once per round, each in a child process, the first rotating; the samples per job and
    each round's order."""
    samples: dict[Key, list[ChildSample]] = {key: [] for key in jobs}
    order = []
    for round_index in range(rounds):
        keys = rotated(list(jobs), round_index)
        order.append([" ".join(key) for key in keys])
        for key in keys:
            log.info("round %d of %d: %s on %s", round_index + 1, rounds, *reversed(key))
            samples[key].append(run_in_child(time_unet_call, jobs[key], what=f"timing {key[1]} ({key[0]})"))
    return samples, order


def measurements(jobs: Mapping[Key, UNetJob], samples: Mapping[Key, list[ChildSample]]) -> tuple[Measurement, ...]:
    """One measurement per backend of a case's jobs, its output compared with the baseline's."""
    from safetensors.torch import load_file

    outputs = {key[1]: load_file(job.output)["noise_pred"] for key, job in jobs.items()}
    reference = outputs[BASELINE]
    found = []
    for (_, backend), runs in samples.items():
        seconds, peaks = tuple(s.seconds for s in runs), tuple(s.peak_rss_bytes for s in runs)
        diff, relative = None, None
        if backend != BASELINE:
            difference = outputs[backend] - reference
            diff, relative = difference.abs().max().item(), (difference.norm() / reference.norm()).item()
        found.append(Measurement(backend, backend, seconds, diff, peaks, relative_error=relative))
    return tuple(found)


def open_seconds(samples: Mapping[Key, list[ChildSample]]) -> dict[str, dict[str, list[float]]]:
    """Case -> backend -> the seconds each of its children took to open the runner (untimed)."""
    found: dict[str, dict[str, list[float]]] = {}
    for (case, backend), runs in samples.items():
        found.setdefault(case, {})[backend] = [s.open_s for s in runs]
    return found
