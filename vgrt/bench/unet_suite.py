"""UNet suite: one conditioned-UNet call per backend, per preset, feature set, precision, batch and latent size.

Each (preset, features, dtype) is exported once, in a child process (so this process's peak memory is
the runners'), into a temporary directory, or taken from --export-dir. Its runners stay open for every
batch and latent size: one PyTorch module (which `torch-bf16` runs under CPU autocast, PyTorch's own
bf16 peer) plus one engine per other backend at a time.
"""

import itertools
import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from vgrt.bench.export_child import export_in_child
from vgrt.bench.results import Case, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import Competitor, measure
from vgrt.engines import open_runner
from vgrt.engines.ort_runner import OrtSettings
from vgrt.export.exporter import ExportSettings
from vgrt.export.feeds import random_feed
from vgrt.export.manifest import read_manifest
from vgrt.models.features import features_text
from vgrt.models.presets import get_preset

log = logging.getLogger(__name__)


def run(settings: BenchSettings) -> SuiteOutput:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ort = OrtSettings(intra_op_threads=settings.threads, reuse_outputs=True)  # reuse: the runtime's hot-path setting
    cases, exports = [], []
    for preset, features, dtype in itertools.product(settings.presets, settings.features, settings.dtypes):
        export_settings = ExportSettings(preset=preset, features=features, dtype=dtype)
        with _exported(export_settings, settings.export_dir) as (directory, made):
            exports.append(made)
            with ExitStack() as stack:
                runners = {
                    backend: stack.enter_context(
                        _runner(settings.quantised_dir if "int8" in backend else directory, backend, device, ort,
                                settings.threads)
                    )
                    for backend in settings.backends
                    if backend != "torch-bf16"  # the torch module, under autocast
                }  # fmt: skip
                cases += _time_sizes(directory, runners, settings, device)
    details = {"torch_device": device, "onnxruntime": asdict(ort), "exports": exports}
    return SuiteOutput("+".join(settings.presets), tuple(cases), details)


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


def _runner(directory: Path, backend: str, device: str, ort: OrtSettings, threads: int):
    if backend == "torch":
        return open_runner(directory, backend="torch", device=device)
    if backend == "onnxruntime-int8":
        return open_runner(directory, backend="onnxruntime", **asdict(ort))
    if backend == "openvino-int8":  # fp32 around the quantised layers, as vgrt compose runs it
        return open_runner(directory, backend="openvino", threads=threads, reuse_outputs=True)
    if backend in ("onnxruntime", "onnxruntime-cuda"):
        provider = "cuda" if backend == "onnxruntime-cuda" else "cpu"
        return open_runner(directory, backend="onnxruntime", **{**asdict(ort), "provider": provider})
    if backend in ("openvino", "openvino-bf16"):
        precision = "bf16" if backend == "openvino-bf16" else "fp32"
        return open_runner(directory, backend="openvino", precision=precision, threads=threads, reuse_outputs=True)
    from vgrt.engines.tensorrt.build import build_engine

    build_engine(directory)  # or finds it in the export's engine cache; not part of the timing
    return open_runner(directory, backend="tensorrt", reuse_outputs=True)


def _time_sizes(directory: Path, runners: dict, settings: BenchSettings, device: str) -> list[Case]:
    manifest = read_manifest(directory)
    unet = manifest.component("unet")
    preset, dtype = manifest.data["preset"], manifest.data["settings"]["dtype"]
    features = features_text(frozenset(unet.features))
    profile = get_preset(preset).profile
    sizes = itertools.product(settings.batches or (profile.batch.opt,), settings.latents or (profile.latent.opt,))
    cases = []
    for batch, latent in sizes:
        feed = random_feed(
            unet.spec, {**unet.spec.profile_sizes("opt"), "batch": batch, "height": latent, "width": latent}
        )
        competitors = [
            _competitor(backend, runners.get(backend) or runners["torch"], feed, device)
            for backend in settings.backends
        ]
        log.info("timing %s batch %d, %dx%d latents: %s", preset, batch, latent, latent, ", ".join(settings.backends))
        latents = f"{latent}x{latent}"
        params = {"preset": preset, "batch": batch, "latent": latents, "features": features, "dtype": dtype}
        measurements = measure(competitors, settings.timing)
        cases.append(Case(f"{preset} {features} {dtype}", f"batch {batch}, {latents}", params, measurements))
    return cases


def _competitor(backend: str, runner, feed: dict[str, torch.Tensor], device: str) -> Competitor:
    # Inputs live where the backend computes, so no host-to-device copy is timed.
    on_gpu = backend != "onnxruntime" and device == "cuda"
    feed = {k: v.to("cuda") for k, v in feed.items()} if on_gpu else feed
    clock = "cuda-events" if on_gpu and backend == "torch" else "wall"
    runner.spec.validate(feed)  # once: the timed calls measure the engine, not vgrt's input checks
    if backend == "torch-bf16":
        return Competitor(backend, backend, lambda: _autocast_bf16(runner, feed, device), clock)
    return Competitor(backend, backend, lambda: runner.infer(feed, validate=False)["noise_pred"], clock)


def _autocast_bf16(runner, feed: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.bfloat16):
        return runner.infer(feed, validate=False)["noise_pred"]
