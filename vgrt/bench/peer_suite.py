"""Peer suite: vgrt's plain text-to-image against optimum-intel's OVStableDiffusionPipeline, the pipeline
users pick for Stable Diffusion on CPUs, on the same weights, noise, prompt, size and steps.

The preset's model is written as a diffusers folder (vgrt.models.diffusers_folder) that both read;
optimum-intel runs in an environment of its own (vgrt.bench.peer_env) from IR converted once. Every
sample is a fresh process per competitor (engines opened, `warmup` untimed images, one timed image),
with the competitors' order rotating each round, so two SD 1.5 engines never share memory and the
machine's drift is spread over all of them. Ratios are to PyTorch eager (vgrt's torch backend, the
diffusers UNet); `details` also gives vgrt over optimum-intel at each precision.
"""

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from vgrt.bench.export_child import run_child, run_json_command
from vgrt.bench.results import Case, Measurement, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.bench.timing import rotated
from vgrt.models.presets import get_preset

log = logging.getLogger(__name__)

PROMPT = "a red ball on green grass under a blue sky"
GUIDANCE_SCALE = 7.5
OPTIMUM = {"optimum-intel": "fp32", "optimum-intel-bf16": "bf16"}  # competitor -> precision
SAME_PRECISION = {"fp32": ("vgrt-openvino", "optimum-intel"), "bf16": ("vgrt-openvino-bf16", "optimum-intel-bf16")}


def run(settings: BenchSettings) -> SuiteOutput:
    from vgrt.bench.peer_env import peer_python, peer_versions
    from vgrt.models.diffusers_folder import write_diffusers_folder
    from vgrt.models.source import ModelSource
    from vgrt.runtime.sampling import random_latents

    (preset_name,) = settings.presets
    preset = get_preset(preset_name)
    latent = settings.latents[0] if settings.latents else preset.profile.latent.opt
    size = latent * preset.vae_factor
    python = peer_python() if any(c in OPTIMUM for c in settings.backends) else None
    with tempfile.TemporaryDirectory(prefix="vgrt-bench-peer-") as tmp:
        tmp = Path(tmp)
        log.info("writing the %s model as a diffusers folder", preset_name)
        folder = write_diffusers_folder(ModelSource(preset_name, 0), tmp / "model")
        noise = random_latents((1, preset.unet["in_channels"], latent, latent), torch.Generator().manual_seed(0))
        np.save(tmp / "latents.npy", noise.numpy())
        request = {
            "preset": preset_name, "prompt": PROMPT, "width": size, "height": size, "steps": settings.steps,
            "guidance_scale": GUIDANCE_SCALE, "threads": settings.threads, "latents": str(tmp / "latents.npy"),
            "cache": str(tmp / "cache"), "warmup": settings.timing.warmup,
        }  # fmt: skip
        prepared = _prepare(settings.backends, folder, tmp, request, python)
        samples, images = _sample(settings, folder, tmp, request, python)
    measurements = tuple(_measurement(name, runs, images) for name, runs in samples.items())
    params = {"preset": preset_name, "size": f"{size}x{size}", "steps": settings.steps}
    case = Case(f"{preset_name} text-to-image", f"{size}x{size}, {settings.steps} steps", params, measurements)
    details = {
        "prompt": PROMPT, "guidance_scale": GUIDANCE_SCALE, "prepared_s": prepared,
        "stages_s": {name: [s["stages"] for s in runs] for name, runs in samples.items() if "stages" in runs[0]},
        "vgrt_over_optimum_intel": _same_precision_ratios(measurements),
        "optimum_intel_versions": peer_versions(python) if python else None,
    }  # fmt: skip
    return SuiteOutput(preset_name, (case,), details)


def _prepare(backends, folder: Path, tmp: Path, request: dict, python: Path | None) -> dict[str, float]:
    """Export vgrt's engines and convert optimum-intel's IR once, untimed, so samples only open them."""
    prepared = {}
    if python is not None:
        log.info("converting the model to OpenVINO IR with optimum-intel")
        prepared["optimum-intel convert"] = _optimum(python, ["convert", str(folder), str(tmp / "ir")])["seconds"]
    for name in backends:
        if name not in OPTIMUM:
            log.info("preparing %s (exports on first use)", name)
            one_step = {**request, "competitor": name, "steps": 1, "warmup": 0, "out": str(tmp / "prepare.npy")}
            prepared[name] = _vgrt(folder, one_step)["seconds"]
    return prepared


def _sample(settings: BenchSettings, folder: Path, tmp: Path, request: dict, python: Path | None):
    samples: dict[str, list[dict]] = {name: [] for name in settings.backends}
    images = {}
    for round_index in range(settings.timing.repeats):
        for name in rotated(settings.backends, round_index):
            out = tmp / f"{name}.npy"
            job = {**request, "competitor": name, "out": str(out)}
            log.info("round %d/%d: %s", round_index + 1, settings.timing.repeats, name)
            if name in OPTIMUM:
                result = _optimum(python, ["run", str(tmp / "ir"), json.dumps({**job, "precision": OPTIMUM[name]})])
            else:
                result = _vgrt(folder, job)
            samples[name].append(result)
            images[name] = np.load(out)
    return samples, images


def _vgrt(folder: Path, job: dict) -> dict:
    return run_child("vgrt.bench.peer_worker", [str(folder), json.dumps(job)], f"vgrt's {job['competitor']} sample")


def _optimum(python: Path, args: list[str]) -> dict:
    script = Path(__file__).with_name("optimum_worker.py")
    return run_json_command([str(python), str(script), *args], f"optimum-intel's {args[0]}")


def _measurement(name: str, runs: list[dict], images: dict[str, np.ndarray]) -> Measurement:
    seconds, peaks = tuple(r["seconds"] for r in runs), tuple(r["peak_rss_bytes"] for r in runs)
    return Measurement(name, name, seconds, _max_abs_diff(images[name], images["torch"]), peaks)


def _max_abs_diff(image: np.ndarray, reference: np.ndarray) -> float | None:
    """Largest pixel difference in [0, 1] units from PyTorch eager's image (None for PyTorch itself)."""
    return None if image is reference else float(np.abs(image.astype(np.float64) - reference).max())


def _same_precision_ratios(measurements: tuple[Measurement, ...]) -> dict[str, float]:
    """vgrt's median over optimum-intel's at each precision both ran (< 1: vgrt is faster)."""
    medians = {m.competitor: m.median_s for m in measurements}
    return {
        precision: medians[ours] / medians[theirs]
        for precision, (ours, theirs) in SAME_PRECISION.items()
        if ours in medians and theirs in medians
    }
