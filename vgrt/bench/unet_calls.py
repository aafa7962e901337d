"""Time a composition's UNet calls and charge each to the stage it ran in, for the host-overhead figure.

A `Composer` made with `runner_hook=UNetCallLog().hook` runs its UNet runners wrapped in `TimedRunner`,
which logs when each backend call starts and how long it takes. What a stage spends outside those calls
(scheduler steps, masks and gates set by a method's hooks, feed copies, the guidance combine, the
runner's own feed checks) is the host work of that stage.
"""

import time
from dataclasses import dataclass

import torch

from vgrt.engines.base import Runner, RunnerWrapper


class TimedRunner(RunnerWrapper):
    """An active runner whose backend calls (`infer_impl`) are logged as (start, seconds) in `calls`.

    The feed checks of `infer` run in this wrapper, outside the logged time: they are host work.
    """

    def __init__(self, runner: Runner, calls: list[tuple[float, float]]):
        super().__init__(runner)
        self.calls = calls

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        outputs = self.runner.infer_impl(feed, sizes)
        self.calls.append((started, time.perf_counter() - started))
        return outputs


@dataclass(frozen=True)
class StageCalls:
    """One stage's UNet calls (those that started in it and in no stage nested inside it), their seconds
    summed, and the stage's own seconds: its timed blocks less the blocks timed inside them (a gradient
    step inside the denoising loop), whether or not the method reports its stage seconds that way."""

    calls: int = 0
    seconds: float = 0.0
    own_seconds: float = 0.0


Span = tuple[str, float, float]  # (stage, start, end), as StageTimes.spans holds them


class UNetCallLog:
    """Every UNet call of the composer it hooks into, oldest first."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def hook(self, component: str, runner: Runner) -> Runner:
        """For `Composer(runner_hook=...)`: wrap UNet runners, leave the encoders' as they are."""
        return TimedRunner(runner, self.calls) if component == "unet" else runner

    def by_stage(self, spans: list[Span]) -> dict[str, StageCalls]:
        """Calls and own seconds per stage of `spans`. A call outside every span is in no stage's
        seconds either, and is left out."""
        found: dict[str, StageCalls] = {}

        def add(stage: str, calls: int = 0, seconds: float = 0.0, own: float = 0.0) -> None:
            old = found.get(stage, StageCalls())
            found[stage] = StageCalls(old.calls + calls, old.seconds + seconds, old.own_seconds + own)

        for span, parent in _parents(spans).items():
            add(span[0], own=span[2] - span[1])
            if parent is not None:
                add(parent[0], own=span[1] - span[2])
        for started, seconds in self.calls:
            around = [span for span in spans if span[1] <= started <= span[2]]
            if around:
                add(min(around, key=lambda span: span[2] - span[1])[0], calls=1, seconds=seconds)
        return found


def _parents(spans: list[Span]) -> dict[Span, Span | None]:
    """The innermost span around each span (timed blocks nest, as context managers do)."""
    parents: dict[Span, Span | None] = {}
    open_spans: list[Span] = []
    for span in sorted(spans, key=lambda span: (span[1], -span[2])):
        while open_spans and open_spans[-1][2] <= span[1]:
            open_spans.pop()
        parents[span] = open_spans[-1] if open_spans else None
        open_spans.append(span)
    return parents
