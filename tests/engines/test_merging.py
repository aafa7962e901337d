"""Merged UNet calls with mutual self-attention: each request's listed rows (mutual_rows) stay its own."""

import threading

import torch

from vgrt.engines import open_runner
from vgrt.engines.base import RunnerWrapper
from vgrt.engines.merging import CallMerger, merge_key, merged_feed
from vgrt.export.feeds import random_feed
from vgrt.export.manifest import read_manifest


class SizesRecorder(RunnerWrapper):
    def __init__(self, runner):
        super().__init__(runner)
        self.sizes = []

    def infer_impl(self, feed, sizes):
        self.sizes.append(dict(sizes))
        return self.runner.infer_impl(feed, sizes)


def _feeds(spec):
    """Two requests' feeds: 3 rows with row 2 listed, 2 rows with both listed; same other sizes."""
    sizes = spec.profile_sizes("opt")
    first = random_feed(spec, {**sizes, "batch": 3, "mutual_rows": 1}, seed=1)
    second = random_feed(spec, {**sizes, "batch": 2, "mutual_rows": 2}, seed=2)
    first["layer_gates"] = second["layer_gates"]  # row-less inputs must agree to merge
    return first, second


def test_merged_feed_offsets_listed_rows_and_concatenates_along_the_list(tiny_export):
    spec = read_manifest(tiny_export(features="mutual")).component("unet").spec
    first, second = _feeds(spec)
    assert merge_key(spec, first) == merge_key(spec, second)  # rows and listed rows may differ
    merged = merged_feed(spec, [first, second], [3, 2])
    assert merged["mutual_rows"].tolist() == [*first["mutual_rows"].tolist(), *(second["mutual_rows"] + 3).tolist()]
    assert merged["kv_index"].shape == (2, 3) and torch.equal(merged["kv_index"][:, 1:], second["kv_index"] + 3)
    assert merged["self_key_masks"].shape[:2] == (2, 3)
    assert merged["sample"].shape[0] == 5


def test_merged_mutual_calls_give_each_request_its_own_result(tiny_export):
    with open_runner(tiny_export(features="mutual"), backend="torch") as engine:
        feeds = _feeds(engine.spec)
        alone = [engine.infer(feed)["noise_pred"] for feed in feeds]
        recorder, merger = SizesRecorder(engine), CallMerger(max_rows=8, wait_s=5.0)
        runner = merger.hook("unet", recorder)
        outputs = [None, None]
        barrier = threading.Barrier(2)

        def call(index):
            with merger.composing():
                barrier.wait(timeout=10)
                outputs[index] = runner.infer(feeds[index])["noise_pred"]

        threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert merger.counted()["merged_calls"] == 1
    assert len(recorder.sizes) == 1 and recorder.sizes[0]["batch"] == 5 and recorder.sizes[0]["mutual_rows"] == 3
    for got, expected in zip(outputs, alone):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
