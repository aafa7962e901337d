"""Concurrent UNet calls merged into one engine call: requests composed at the same time, each in its own
thread over one shared Composer, share each step's call (`vgrt serve --max-batch N`).

    merger = CallMerger(max_rows=preset.profile.batch.max, wait_s=0.01)
    composer = Composer(source, backend, runner_hook=merger.hook)
    with merger.composing():                 # in each thread that composes a request
        method.compose(composer, request)

Calls to one runner merge when their feeds differ only along their row axes (ComponentSpec.row_axis: the
spec's "batch" dim, or the dim of a list of batch rows such as mutual self-attention's "mutual_rows"; same
sizes of every other dim, same dtypes and devices) and their row-less inputs (the per-block `layer_gates`)
hold equal values. The merged feed is each input concatenated along its row axis, with the inputs that
index batch rows (`index_of == "batch"`: mutual self-attention's mutual_rows, q_index and kv_index)
offset by the batch rows before them, so each request's rows still read only its own rows; the outputs
are split back along their batch axis. Rows are independent in the UNet, so a request gets what
it would get alone, up to the backend choosing other kernels or blockings for the larger batch.

A call waits for partners in a group, at most `wait_s`, and not at all when it cannot have one: fewer than
two compositions registered (`composing()`), or its rows fill the profile's batch maximum alone. A group
runs as soon as every registered composition is waiting in some group or running an engine call (none
can join soon; waiting for a running call would cost a whole call), when no row more fits, or when its
first call has waited `wait_s`. Threads in the step loop come back to the UNet within the host work of a
step, so concurrent requests fall into step: their calls meet each step. If a merged call raises (a larger batch can run
out of device memory), each of its calls runs again alone, so one request's failure stays its own.
"""

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from vgrt.engines.base import Runner, RunnerWrapper
from vgrt.export.spec import ComponentSpec

Feed = dict[str, torch.Tensor]


@dataclass(eq=False)
class _Call:
    feed: Feed
    sizes: dict[str, int]
    outputs: Feed | None = None  # set by a merged call; None: the call runs alone
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Group:
    runner: Runner
    key: tuple
    calls: list[_Call]
    rows: int


class CallMerger:
    """Merges concurrent calls of the UNet runners it wraps (`hook`), up to `max_rows` rows per engine call.

    counts: 'calls' (calls made to the wrapped runners), 'engine_calls' (calls the engines ran) and
    'merged_calls' (engine calls that ran two or more calls), for benchmarks and logs."""

    def __init__(self, max_rows: int, wait_s: float) -> None:
        self.max_rows, self.wait_s = max_rows, wait_s
        self.counts: Counter[str] = Counter()
        self._changed = threading.Condition()  # guards everything below and `counts`
        self._composing = 0  # compositions registered: the threads that may call
        self._waiting = 0  # calls in open groups
        self._running = 0  # calls in engine calls
        self._open: list[_Group] = []

    def counted(self) -> dict[str, int]:
        """A copy of `counts`, taken while no call changes it."""
        with self._changed:
            return dict(self.counts)

    def hook(self, component: str, runner: Runner) -> Runner:
        """For `Composer(runner_hook=...)`: wrap UNet runners, leave the encoders' as they are."""
        return MergingRunner(runner, self) if component == "unet" else runner

    @contextmanager
    def composing(self) -> Iterator[None]:
        """Register the calling thread's composition: calls wait for partners only while two or more are."""
        with self._changed:
            self._composing += 1
        try:
            yield
        finally:
            with self._changed:
                self._composing -= 1
                self._changed.notify_all()  # a group waiting for this composition need not wait longer

    def call(self, runner: Runner, feed: Feed, sizes: dict[str, int]) -> Feed:
        """`runner.infer_impl(feed, sizes)`, merged with concurrent calls where they allow it."""
        rows = sizes["batch"]
        key = merge_key(runner.spec, feed)
        call = _Call(feed, sizes)
        with self._changed:
            self.counts["calls"] += 1
            group, leads = None, False
            if key is not None and self._composing > 1 and rows < self.max_rows:  # a partner may come and fit
                group, leads = self._join(runner, key, call, rows)
        if leads:
            self._lead(group)
        elif group is not None:
            call.done.wait()  # the group's first call runs it and sets this, whatever happens
        if call.outputs is None:  # no partner came, or the merged call failed
            return self._alone(runner, call)
        return call.outputs

    def _join(self, runner: Runner, key: tuple, call: _Call, rows: int) -> tuple[_Group, bool]:
        """The open group `call` joins, or a new one it leads; under the lock."""
        self._waiting += 1
        self._changed.notify_all()  # groups re-check whether everyone is waiting now
        for group in self._open:
            fits = group.rows + rows <= self.max_rows
            if group.runner is runner and group.key == key and fits and _same_unbatched(runner.spec, group, call):
                group.calls.append(call)
                group.rows += rows
                return group, False
        group = _Group(runner, key, [call], rows)
        self._open.append(group)
        return group, True

    def _lead(self, group: _Group) -> None:
        """Wait for partners, close the group, run it and hand each call its outputs.

        The wait ends when no row more fits, or when every registered composition is waiting in a group or
        running an engine call (none can join soon: waiting for a running call would cost a whole call),
        or after wait_s."""
        with self._changed:
            self._changed.wait_for(
                lambda: group.rows >= self.max_rows or self._waiting + self._running >= self._composing,
                timeout=self.wait_s,
            )
            self._open.remove(group)
            self._waiting -= len(group.calls)
            merged = len(group.calls) > 1
            if merged:
                self.counts["engine_calls"] += 1
                self.counts["merged_calls"] += 1
                self._running += len(group.calls)
                self._changed.notify_all()
        try:
            if merged:
                self._run_merged(group)
        finally:
            if merged:
                with self._changed:
                    self._running -= len(group.calls)
            for call in group.calls:
                call.done.set()

    def _run_merged(self, group: _Group) -> None:
        calls = group.calls
        spec, rows = group.runner.spec, [call.sizes["batch"] for call in calls]
        try:
            merged = merged_feed(spec, [c.feed for c in calls], rows)
            outputs = group.runner.infer_impl(merged, _merged_sizes(spec, calls))
            splits = split_outputs(spec, outputs, rows)
        except Exception:  # noqa: BLE001 - each call runs alone instead, and meets its own error, if any
            with self._changed:
                self.counts["merged_calls_failed"] += 1
            return
        for call, split in zip(calls, splits):
            call.outputs = split

    def _alone(self, runner: Runner, call: _Call) -> Feed:
        with self._changed:
            self.counts["engine_calls"] += 1
            self._running += 1
            self._changed.notify_all()
        try:
            return runner.infer_impl(call.feed, call.sizes)
        finally:
            with self._changed:
                self._running -= 1


class MergingRunner(RunnerWrapper):
    """A UNet runner whose calls go through a `CallMerger`."""

    def __init__(self, runner: Runner, merger: CallMerger):
        super().__init__(runner)
        self.merger = merger

    def infer_impl(self, feed: Feed, sizes: dict[str, int]) -> Feed:
        return self.merger.call(self.runner, feed, sizes)


def batch_axis(shape: tuple) -> int | None:
    """The axis of the "batch" dim in a spec shape, or None."""
    return shape.index("batch") if "batch" in shape else None


def merge_key(spec: ComponentSpec, feed: Feed) -> tuple | None:
    """What calls must share to merge: every input's dtype, device and sizes off its row axis. None
    for a feed that cannot merge (a batch-row index without a row axis to concatenate it along)."""
    key = []
    for t in spec.inputs:
        value, axis = feed[t.name], spec.row_axis(t)
        if t.index_of == "batch" and axis is None:
            return None
        shape = tuple(size for i, size in enumerate(value.shape) if i != axis)
        key.append((t.name, value.dtype, value.device, shape))
    return tuple(key)


def _same_unbatched(spec: ComponentSpec, group: _Group, call: _Call) -> bool:
    """Whether `call`'s row-less inputs hold the values of the group's (one engine call takes one of each)."""
    first = group.calls[0].feed
    return all(
        first[t.name] is call.feed[t.name] or torch.equal(first[t.name], call.feed[t.name])
        for t in spec.inputs
        if spec.row_axis(t) is None
    )


def merged_feed(spec: ComponentSpec, feeds: list[Feed], rows: list[int]) -> Feed:
    """One feed of all `feeds`' rows (`rows` batch rows each), in order: inputs with a row axis concatenated
    along it (batch-row indices offset by the batch rows before them), row-less inputs taken from the first
    feed."""
    offsets = [sum(rows[:i]) for i in range(len(feeds))]
    merged = {}
    for t in spec.inputs:
        axis = spec.row_axis(t)
        if axis is None:
            merged[t.name] = feeds[0][t.name]
        elif t.index_of == "batch":
            merged[t.name] = torch.cat([feed[t.name] + offset for feed, offset in zip(feeds, offsets)], axis)
        else:
            merged[t.name] = torch.cat([feed[t.name] for feed in feeds], axis)
    return merged


def split_outputs(spec: ComponentSpec, outputs: Feed, rows: list[int]) -> list[Feed]:
    """Each call's rows of a merged call's outputs, as tensors of their own (a runner made with
    reuse_outputs overwrites its buffers on a later call, which another thread may make first)."""
    split: list[Feed] = [{} for _ in rows]
    for t in spec.outputs:
        axis = batch_axis(t.shape)
        for part, value in zip(split, outputs[t.name].split(rows, axis)):
            part[t.name] = value.clone()
    return split


def _merged_sizes(spec: ComponentSpec, calls: list[_Call]) -> dict[str, Any]:
    """The calls' sizes with every row dim (ComponentSpec.row_dims) summed over the calls."""
    summed = {dim: sum(call.sizes[dim] for call in calls) for dim in spec.row_dims() if dim in calls[0].sizes}
    return {**calls[0].sizes, **summed}
