"""How far an INT8 UNet moves a method's results, read against a noise floor measured the same way.

Each run is composed three times: with the fp32 UNet (the reference), with the INT8 UNet swapped in
through the Composer's runner hook (everything else, encoders and decoder, stays the same), and with
the noise floor: the fp32 UNet under OpenVINO's bf16 arithmetic where the CPU has it, else ONNX Runtime
fp32 on one thread instead of the default (reordered sums only). With random weights the absolute figures
mean little; INT8 is acceptable where it is no further from fp32 than bf16 is.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgrt.calibration.capture import PlannedRun
from vgrt.engines import open_runner
from vgrt.engines.base import Runner
from vgrt.models.source import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunQuality:
    """One run's final latents' relative error and decoded image PSNR (dB) against fp32."""

    method: str
    seed: int | None
    int8_latents_error: float
    int8_psnr_db: float
    floor: str  # what the floor is: 'openvino bf16' or 'onnxruntime fp32, 1 thread'
    floor_latents_error: float
    floor_psnr_db: float


def quality_report(
    runs: list[PlannedRun], source: ModelSource, int8_dir: str | Path, cache: str | Path | None = None
) -> list[RunQuality]:
    """Each run composed with fp32, with the INT8 UNet of `int8_dir`, and at the noise floor."""
    from vgrt.runtime.composer import Composer

    floor, floor_options = _noise_floor()
    swap = UNetSwap(Path(int8_dir))
    report = []
    for run in runs:
        results = {}
        for label, backend, options, hook in (
            ("fp32", "onnxruntime", {}, None),
            ("int8", "onnxruntime", {}, swap.hook),
            ("floor", *floor_options, None),
        ):
            with Composer(source, backend, cache=cache, progress=False, runner_options=options, runner_hook=hook) as c:
                results[label] = run.compose(c, run.request)
        reference = results["fp32"]
        report.append(
            RunQuality(
                run.method,
                run.seed,
                _relative(results["int8"].latents, reference.latents),
                psnr_db(results["int8"].image, reference.image),
                floor,
                _relative(results["floor"].latents, reference.latents),
                psnr_db(results["floor"].image, reference.image),
            )
        )
    return report


class UNetSwap:
    """A runner hook that runs the INT8 UNet in place of the fp32 UNet of the same inputs (the Composer
    closes the runner it returns with its own)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def hook(self, component: str, runner: Runner) -> Runner:
        if component != "unet":
            return runner
        quantised = open_runner(self.directory, backend="onnxruntime")
        if [t.name for t in quantised.spec.inputs] != [t.name for t in runner.spec.inputs]:
            return runner  # another feature set's UNet: not the one quantised
        runner.deactivate()
        return quantised.activate()


def _noise_floor() -> tuple[str, tuple[str, dict[str, Any]]]:
    """('what', (backend, runner options)) of the floor: OpenVINO bf16 where the CPU has BF16 units."""
    try:
        from vgrt._lazy import require
        from vgrt.engines.openvino_runner import check_precision

        check_precision(require("openvino").Core(), "bf16")
        return "openvino bf16", ("openvino", {"precision": "bf16"})
    except Exception as err:  # noqa: BLE001 - no OpenVINO, or no BF16 units: the thread-count floor
        log.info("no bf16 floor (%s): using ONNX Runtime fp32 on one thread", err)
        return "onnxruntime fp32, 1 thread", ("onnxruntime", {"intra_op_threads": 1})


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2); inf when they are equal."""
    mse = ((image.float() - reference.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
