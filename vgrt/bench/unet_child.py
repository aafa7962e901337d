"""One competitor's turn in `vgrt bench unet`, run in a child process of its own (vgrt.bench.child).

The child opens the backend's runner on the export, reads the feed the benchmark wrote once, makes the
warm-up calls, times one call and writes the last warm-up call's output (the same feed, so the same
output) for the error columns. It returns the timed seconds, the seconds it took to open the runner
(not part of the timing) and its peak resident memory: opening, warm-up and the timed call together.
"""

import gc
import time
from dataclasses import dataclass

import torch

# The backends whose inputs live on the GPU when there is one (the others compute on the CPU), so no
# host-to-device copy is timed.
GPU_BACKENDS = ("torch", "torch-bf16", "onnxruntime-cuda", "tensorrt")


@dataclass(frozen=True)
class UNetJob:
    """What one child times: `backend` on the export in `directory`, fed the safetensors file `feed`."""

    backend: str
    directory: str
    feed: str
    output: str  # safetensors file the child writes its output to
    threads: int
    device: str  # where PyTorch computes: "cpu" or "cuda"
    warmup: int


@dataclass(frozen=True)
class ChildSample:
    seconds: float  # the timed call
    open_s: float  # opening the runner (a TensorRT engine build included), untimed
    peak_rss_bytes: int  # the child's peak resident memory


def time_unet_call(job: UNetJob) -> ChildSample:
    """Run in a child: open, warm up, time one call, write the output; see the module docstring."""
    from safetensors.torch import load_file, save_file

    from vgrt.bench.machine import peak_rss_bytes
    from vgrt.bench.timing import Competitor, time_call

    torch.set_num_threads(job.threads)
    on_gpu = job.device == "cuda" and job.backend in GPU_BACKENDS
    feed = {name: value.to("cuda") if on_gpu else value for name, value in load_file(job.feed).items()}
    started = time.perf_counter()
    with open_unet_runner(job.directory, job.backend, job.device, job.threads) as runner:
        open_s = time.perf_counter() - started
        runner.spec.validate(feed)  # once: the timed call measures the engine, not vgrt's input checks
        if job.backend == "torch-bf16":
            competitor = Competitor(job.backend, job.backend, lambda: _autocast_bf16(runner, feed, job.device))
        else:
            competitor = Competitor(job.backend, job.backend, lambda: runner.infer(feed, validate=False)["noise_pred"])
        if on_gpu and job.backend.startswith("torch"):
            competitor = Competitor(competitor.name, competitor.backend, competitor.call, "cuda-events")
        for _ in range(job.warmup):
            output = competitor.call()
        # Copied now: a runner that reuses its output buffers overwrites them on the next call.
        output = output.detach().float().cpu().contiguous().clone()
        gc.collect()
        gc.disable()  # a collection inside the timed call would be charged to it
        try:
            seconds = time_call(competitor)
        finally:
            gc.enable()
    save_file({"noise_pred": output}, job.output)
    return ChildSample(seconds, open_s, peak_rss_bytes())


def open_unet_runner(directory: str, backend: str, device: str, threads: int):
    """The runner (not yet active) of the export's UNet on a competitor `backend` of the unet suite,
    with the settings vgrt compose runs it with."""
    from vgrt.engines import open_runner

    if backend in ("torch", "torch-bf16"):  # torch-bf16: the same module under autocast
        return open_runner(directory, backend="torch", device=device)
    if backend in ("onnxruntime", "onnxruntime-int8", "onnxruntime-cuda"):
        provider = "cuda" if backend == "onnxruntime-cuda" else "cpu"
        return open_runner(
            directory, backend="onnxruntime", intra_op_threads=threads, reuse_outputs=True, provider=provider
        )
    if backend.startswith("openvino"):  # int8: fp32 around the quantised layers; dynamic: static_shapes=False
        precision = "bf16" if backend == "openvino-bf16" else "fp32"
        settings = {"static_shapes": False} if backend == "openvino-dynamic" else {}
        return open_runner(
            directory, backend="openvino", precision=precision, threads=threads, reuse_outputs=True, **settings
        )
    from vgrt.engines.tensorrt.build import build_engine

    build_engine(directory)  # or finds it in the export's engine cache
    return open_runner(directory, backend="tensorrt", reuse_outputs=True)


def _autocast_bf16(runner, feed: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.bfloat16):
        return runner.infer(feed, validate=False)["noise_pred"]
