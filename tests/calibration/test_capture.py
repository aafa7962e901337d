"""Capture: feeds recorded through the runner hook round-trip through the set on disk, a re-run resumes,
and an interrupted capture leaves nothing the set trusts.

The fast tests run a stand-in method (a few UNet calls of known feeds) through a stand-in Composer whose
UNet runner is a stub, so they test the capture and the set, not the engines; the slow one captures a
real method on the tiny preset.
"""

import dataclasses

import pytest
import torch

from vgrt.engines.base import Runner
from vgrt.models.presets import get_preset


@dataclasses.dataclass(frozen=True)
class StubRequest:
    seed: int = 0
    steps: int = 5
    width: int = 128
    height: int = 128


class StubRunner(Runner):
    backend = "stub"

    def activate_impl(self) -> None: ...

    def deactivate_impl(self) -> None: ...

    def infer_impl(self, feed, sizes):
        return {t.name: torch.zeros(self.spec.shape(t, sizes)) for t in self.spec.outputs}


@pytest.fixture
def stub_composer(monkeypatch):
    """Composer replaced by a stand-in whose UNet runner is a stub; `made` counts the composers made."""
    from vgrt.export.components import build_component
    from vgrt.models.source import ModelSource

    spec = build_component("unet", ModelSource("tiny"), frozenset(), "float32").spec
    made = []

    class StubComposer:
        def __init__(self, source, backend, cache=None, progress=True, runner_hook=None):
            self.unet = runner_hook("unet", StubRunner(spec).activate())
            made.append(self)

        def runner(self, component, features="none"):
            return self.unet

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr("vgrt.runtime.composer.Composer", StubComposer)
    return spec, made


def feed_of(spec, seed: int, call: int) -> dict[str, torch.Tensor]:
    from vgrt.export.feeds import random_feed

    return random_feed(spec, {"batch": 2, "height": 16, "width": 16, "context": 77}, seed=1000 * seed + call)


def stub_method(spec, calls: int = 5, fail_after: int | None = None):
    """compose(composer, request): `calls` UNet calls of known feeds, reusing one feed buffer as the
    methods do; raises KeyboardInterrupt after `fail_after` calls."""

    def compose(composer, request):
        buffer = {name: value.clone() for name, value in feed_of(spec, request.seed, 0).items()}
        for call in range(calls):
            if call == fail_after:
                raise KeyboardInterrupt
            for name, value in feed_of(spec, request.seed, call).items():
                buffer[name].copy_(value)
            composer.runner("unet").infer(buffer)

    compose.__module__ = __name__
    return compose


def planned(spec, seeds=(0, 1), **stub):
    from vgrt.calibration.capture import PlannedRun

    return [PlannedRun("stub", "none", stub_method(spec, **stub), StubRequest(seed), seed) for seed in seeds]


def test_captured_feeds_round_trip_with_the_chosen_calls(stub_composer, tmp_path):
    from vgrt.calibration.capture import CallSelection, capture
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    calibration = capture(tmp_path / "set", ModelSource("tiny"), planned(spec), CallSelection.parse("every:2"), 4)
    assert len(calibration) == 4 and [run.samples for run in calibration.runs.values()] == [2, 2]
    run = next(iter(calibration.runs.values()))
    assert (run.calls, run.seed, run.features, run.size) == (5, 0, "none", (128, 128))
    assert run.inputs["sample"] == {"dtype": "float32", "shape": [2, 4, 16, 16]}
    # calls 0, 2, 4 are chosen; a quota of 2 keeps the first and the last
    expected = [feed_of(spec, seed, call) for seed in (0, 1) for call in (0, 4)]
    got = list(calibration.samples())
    assert len(got) == 4
    for feed, want in zip(got, expected):
        assert feed.keys() == want.keys()
        assert all(torch.equal(feed[name], want[name]) for name in want)


def test_a_rerun_resumes_capturing_only_the_runs_missing(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.models.source import ModelSource

    spec, made = stub_composer
    first = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0,)), max_samples=10)
    shard = tmp_path / "set" / next(iter(first.runs.values())).shard
    stamp = shard.stat().st_mtime_ns
    again = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0,)), max_samples=10)
    assert len(made) == 1 and again.runs == first.runs  # nothing ran: no composer was even made
    more = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0, 1)), max_samples=10)
    assert len(made) == 2 and [r.seed for r in more.runs.values()] == [0, 1]
    assert [r.samples for r in more.runs.values()] == [5, 5]  # the second run got what the first left
    assert shard.stat().st_mtime_ns == stamp


def test_max_samples_caps_the_set_across_runs_and_reruns(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.models.source import ModelSource

    spec, made = stub_composer
    calibration = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0, 1)), max_samples=3)
    assert [run.samples for run in calibration.runs.values()] == [1, 2]
    full = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0, 1, 2)), max_samples=3)
    assert len(full) == 3 and len(full.runs) == 2 and len(made) == 1  # the third run finds no room left


def test_an_interrupted_first_capture_leaves_no_set(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.calibration.dataset import read_set
    from vgrt.errors import ArtifactError
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "set", ModelSource("tiny"), planned(spec, fail_after=3))
    assert list((tmp_path / "set").iterdir()) == []
    with pytest.raises(ArtifactError, match="holds no calibration set"):
        read_set(tmp_path / "set")


def test_what_a_killed_capture_left_is_not_trusted_and_is_removed(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.calibration.dataset import read_set
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0,)))
    # a writer killed after its shard was renamed in, before the manifest listed it, and one killed mid-write
    (tmp_path / "set" / "run-stub-0123456789ab.safetensors").write_bytes(b"half")
    (tmp_path / "set" / ".run-stub-0123456789ab.safetensors.tmp-0000abcd").write_bytes(b"half")
    assert list(read_set(tmp_path / "set").runs) == [planned(spec, seeds=(0,))[0].key]
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0, 1), fail_after=2))
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "calibration.json",
        f"run-{planned(spec, seeds=(0,))[0].key}.safetensors",
    ]


def test_a_damaged_shard_is_refused_when_read(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.errors import ArtifactError
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    calibration = capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0,)))
    shard = tmp_path / "set" / next(iter(calibration.runs.values())).shard
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed since it was captured"):
        list(calibration.samples())


def test_a_set_of_other_weights_is_refused(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.errors import InvalidInputError
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0,)))
    with pytest.raises(InvalidInputError, match="was captured with .*'seed': 0.*not .*'seed': 7"):
        capture(tmp_path / "set", ModelSource("tiny", seed=7), planned(spec, seeds=(0,)))


@pytest.mark.parametrize("text", ["every:0", "-1,2", "some", ""])
def test_bad_call_selections_are_refused(text):
    from vgrt.calibration.capture import CallSelection
    from vgrt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="is not 'all', 'every:K'"):
        CallSelection.parse(text)


@pytest.mark.slow
def test_a_real_method_run_is_captured(tmp_path, composer_cache):
    from vgrt.calibration.capture import capture, example_runs
    from vgrt.models.source import ModelSource

    runs = example_runs("mca-ctrl", get_preset("tiny"), size=32, steps=2, seeds=(0,))
    calibration = capture(tmp_path / "set", ModelSource("tiny"), runs, cache=composer_cache, progress=False)
    (run,) = calibration.runs.values()
    # 2 inversion calls of the plain UNet (another layout: left out) and 2 denoising calls of the mutual one
    assert run.features == "mutual" and run.calls == 4 and run.samples == 2
    assert {"self_key_masks", "q_index", "kv_index"} <= set(run.inputs)
    feeds = list(calibration.samples())
    assert not torch.equal(feeds[0]["sample"], feeds[-1]["sample"])  # copies, not the reused buffer


def test_a_run_keeps_its_own_layout_when_an_inversion_makes_as_many_calls():
    import torch

    from vgrt.calibration.capture import CallSelection, FeedRecorder

    plain = {"sample": torch.zeros(1), "timestep": torch.zeros(1), "encoder_hidden_states": torch.zeros(1)}
    mutual = {**plain, "self_key_masks": torch.ones(1), "q_index": torch.zeros(1, dtype=torch.int64)}
    recorder = FeedRecorder()
    recorder.calls.extend([plain] * 3 + [mutual] * 3)  # MCA-Ctrl: 3 inversion steps, then 3 denoising steps
    made, samples = recorder.take(CallSelection(), quota=10)
    assert made == 6 and len(samples) == 3 and all(set(feed) == set(mutual) for feed in samples)
