"""Batched serving without Ray: concurrent UNet calls merged into one engine call (vgrt.engines.merging),
each request still getting what it gets alone, and the batching settings checked before any work."""

import asyncio
import threading
import time

import pytest
import torch

from vgrt.cli import main
from vgrt.client import multipart
from vgrt.engines.base import Runner
from vgrt.engines.merging import CallMerger
from vgrt.errors import InvalidInputError, VgrtError
from vgrt.export.spec import ComponentSpec, TensorSpec
from vgrt.models.presets import Range
from vgrt.serve.service import ComposeService, ServeSettings

from ..cli_args import mca_ctrl_args

# A UNet-shaped spec: batch rows, a non-batch dim, a batch-row index (as mutual attention's kv_index) and
# a batch-less input (as layer_gates).
SPEC = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float32", ("batch", "width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("kv_index", "int64", ("groups", "batch"), index_of="batch"),
        TensorSpec("layer_gates", "float32", (2,)),
    ),
    outputs=(TensorSpec("noise_pred", "float32", ("batch", "width")),),
    dims={"batch": Range(1, 2, 8), "width": Range(1, 4, 8), "groups": Range(1, 1, 2)},
)


class RowsRunner(Runner):
    """Each output row reads the row its kv_index names, as mutual attention does; records each call's rows.
    Raises on calls of more than `fails_above` rows."""

    def __init__(self, fails_above: int = 99) -> None:
        super().__init__(SPEC)
        self.rows: list[int] = []
        self.fails_above = fails_above

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, feed, sizes):
        self.rows.append(sizes["batch"])
        if sizes["batch"] > self.fails_above:
            raise VgrtError(f"{sizes['batch']} rows do not fit")
        read = feed["sample"][feed["kv_index"][0]]
        return {"noise_pred": read * feed["layer_gates"][0] + feed["timestep"][:, None]}


def _feed(seed: int, width: int = 4, gate: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, width, generator=generator),
        "timestep": torch.tensor([seed, seed + 0.5]),
        "kv_index": torch.tensor([[1, 0]]),  # each row reads the other row of its own request
        "layer_gates": torch.tensor([gate, 0.0]),
    }


def _concurrently(merger: CallMerger, runner: Runner, feeds: list[dict]) -> tuple[list[dict], float]:
    """Each feed's outputs, each called from a thread of its own registered as composing; the seconds."""
    outputs, errors = [None] * len(feeds), []
    barrier = threading.Barrier(len(feeds))

    def call(index: int) -> None:
        with merger.composing():
            barrier.wait(timeout=10)
            try:
                outputs[index] = runner.infer(feeds[index])
            except VgrtError as err:
                errors.append(err)

    started = time.perf_counter()
    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return outputs, time.perf_counter() - started


def _alone(feed: dict) -> torch.Tensor:
    return RowsRunner().activate().infer(feed)["noise_pred"]


def test_concurrent_calls_merge_into_one_engine_call_and_each_gets_its_own_rows():
    engine, merger = RowsRunner(), CallMerger(max_rows=8, wait_s=5.0)
    runner = merger.hook("unet", engine.activate())
    feeds = [_feed(seed) for seed in range(3)]
    outputs, seconds = _concurrently(merger, runner, feeds)
    assert engine.rows == [6]  # one engine call, the kv_index of the 2nd and 3rd offset to their own rows
    for feed, output in zip(feeds, outputs):
        assert torch.equal(output["noise_pred"], _alone(feed))
    assert seconds < 2.5  # the group ran once every composition was in it, not after wait_s
    assert merger.counts == {"calls": 3, "engine_calls": 1, "merged_calls": 1}


def test_a_lone_composition_never_waits():
    engine, merger = RowsRunner(), CallMerger(max_rows=8, wait_s=5.0)
    runner = merger.hook("unet", engine.activate())
    _, seconds = _concurrently(merger, runner, [_feed(0)])
    assert engine.rows == [2] and seconds < 1.0


@pytest.mark.parametrize(
    "feeds, max_rows",
    [
        ([_feed(0, width=4), _feed(1, width=6)], 8),  # another size off the batch axis
        ([_feed(0, gate=1.0), _feed(1, gate=0.5)], 8),  # other batch-less values: one engine call takes one
        ([_feed(0), _feed(1)], 3),  # together over the profile's batch maximum
    ],
)
def test_calls_that_cannot_merge_run_alone_without_waiting_out_the_window(feeds, max_rows):
    engine, merger = RowsRunner(), CallMerger(max_rows=max_rows, wait_s=5.0)
    runner = merger.hook("unet", engine.activate())
    outputs, seconds = _concurrently(merger, runner, feeds)
    assert engine.rows == [2, 2] and seconds < 2.5  # each group ran once both were waiting
    for feed, output in zip(feeds, outputs):
        assert torch.equal(output["noise_pred"], _alone(feed))


def test_a_failed_merged_call_runs_each_call_alone():
    engine, merger = RowsRunner(fails_above=2), CallMerger(max_rows=8, wait_s=5.0)  # as a GPU out of memory
    runner = merger.hook("unet", engine.activate())
    feeds = [_feed(0), _feed(1)]
    outputs, _ = _concurrently(merger, runner, feeds)
    assert sorted(engine.rows) == [2, 2, 4] and merger.counts["merged_calls_failed"] == 1
    for feed, output in zip(feeds, outputs):
        assert torch.equal(output["noise_pred"], _alone(feed))


def test_encoders_are_not_wrapped():
    runner = RowsRunner().activate()
    assert CallMerger(max_rows=8, wait_s=0.01).hook("vae_decoder", runner) is runner


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_batch": 0}, r"max_batch must be a whole number >= 1 \(1: no batching\), got 0"),
        ({"max_batch": 2.5}, "max_batch must be a whole number >= 1"),
        ({"batch_wait_ms": -1}, r"batch_wait_ms must be a number of milliseconds in \[0, 10000\], got -1"),
    ],
)
def test_batching_settings_are_refused_before_any_export(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        ServeSettings.from_mapping(settings).check()


PROMPTS = ("a red ball", "a blue cube")


def _mca_ctrl_inputs(examples, **extra):
    files = {"subject": "subject.png", "subject_mask": "subject_mask.png", "condition": "scene.png",
             "region_mask": "region_mask.png"}  # fmt: skip
    return {name: (examples / file).read_bytes() for name, file in files.items()} | extra


async def _post_together(service, requests: list[dict]):
    replies = []
    for index, inputs in enumerate(requests):
        body, content_type = multipart(inputs)
        replies.append(service.handle("POST", "/compose/mca-ctrl", {"content-type": content_type}, body, f"r{index}"))
    return await asyncio.gather(*replies)


def test_requests_composed_together_get_the_images_vgrt_compose_makes(examples, tmp_path, composer_cache):
    expected = []
    for index, prompt in enumerate(PROMPTS):
        out = tmp_path / f"cli-{index}.png"
        extra = ["--seed", str(index), "--prompt", prompt, "--backend", "onnxruntime", "--cache", str(composer_cache)]
        assert main(mca_ctrl_args(examples, out, *extra)) == 0
        expected.append(out.read_bytes())
    settings = ServeSettings(
        backend="onnxruntime", cache=str(composer_cache), methods=("mca-ctrl",), warmup="open", max_batch=2,
        batch_wait_ms=2000,
    )  # fmt: skip
    service = ComposeService(settings)
    service.load()
    try:
        requests = [_mca_ctrl_inputs(examples, steps=2, seed=index, prompt=p) for index, p in enumerate(PROMPTS)]
        replies = asyncio.run(_post_together(service, requests))
    finally:
        service.close()
    assert [reply.status for reply in replies] == [200, 200]
    assert [reply.body for reply in replies] == expected  # bit for bit, each its own
    # The inversions' plain-UNet calls (2 rows each) merged; the mutual calls (6 rows each, 12 over the
    # tiny profile's 8) ran alone.
    assert service.merger.counts["merged_calls"] >= 1
    assert service.merger.counts["engine_calls"] < service.merger.counts["calls"]
