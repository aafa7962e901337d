"""The timing harness: every competitor of a case measured in one loop, repetitions interleaved.

Why interleaved: this machine's timings drift by +-20% over minutes (thermal state, neighbours, page
cache). Timing A five times and then B five times would charge that drift to one of them; alternating
A, B, A, B (with the starting competitor rotating each round) spreads it over both.
"""

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vgrt.bench.results import Measurement
from vgrt.bench.settings import TimingSettings


@dataclass(frozen=True)
class Competitor:
    """One implementation to time. `call` runs it once and returns its output tensor.

    clock: "wall" (perf_counter around the call, the GPU synchronised before and after) or
    "cuda-events" for work queued on PyTorch's current CUDA stream (events time the GPU work itself,
    not the launch). ONNX Runtime's CUDA provider runs on a stream of its own, so it uses "wall".
    """

    name: str
    backend: str
    call: Callable[[], torch.Tensor]
    clock: str = "wall"


def measure(
    competitors: Sequence[Competitor], timing: TimingSettings, baseline: str | None = "torch"
) -> tuple[Measurement, ...]:
    """Warm every competitor up, then time `timing.repeats` interleaved rounds of one call each."""
    outputs = {}
    for round_index in range(timing.warmup):
        for competitor in rotated(competitors, round_index):
            outputs[competitor.name] = competitor.call()
    # Copied now: a runner that reuses its output buffers overwrites them on the next call.
    outputs = {name: out.detach().float().cpu().clone() for name, out in outputs.items()}
    samples: dict[str, list[float]] = {c.name: [] for c in competitors}
    gc.collect()
    gc.disable()  # a collection inside one timed call would be charged to whichever competitor ran then
    try:
        for round_index in range(timing.repeats):
            for competitor in rotated(competitors, round_index):
                samples[competitor.name].append(time_call(competitor))
    finally:
        gc.enable()
    reference = outputs.get(baseline)
    return tuple(
        Measurement(c.name, c.backend, tuple(samples[c.name]), _max_abs_diff(outputs.get(c.name), reference))
        for c in competitors
    )


def _max_abs_diff(output: torch.Tensor | None, reference: torch.Tensor | None) -> float | None:
    """None for the baseline itself (compared with nothing) or when there was no warm-up output."""
    if output is None or reference is None or output is reference:
        return None
    return (output - reference).abs().max().item()


def rotated(items: Sequence, shift: int) -> list:
    """The sequence started at index `shift` (mod its length): the order of round `shift` of an
    interleaved loop (the compose suite rotates its backends the same way)."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def time_call(competitor: Competitor) -> float:
    """Seconds of one call of `competitor`, on its clock."""
    if competitor.clock == "cuda-events":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        competitor.call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    _synchronize()
    started = time.perf_counter()
    competitor.call()
    _synchronize()
    return time.perf_counter() - started


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
