"""Capture: feeds recorded through the runner hook round-trip through the set on disk, a re-run resumes,
and an interrupted capture leaves nothing the set trusts.

The fast tests run a stand-in method (a few UNet calls of known feeds) through a stand-in Composer whose
UNet runners are stubs, so they test the capture and the set, not the engines; tests/calibration/
test_layouts.py captures a real method (MCA-Ctrl, two UNets) on the tiny preset.
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


def tiny_unet_spec(features: str = "none"):
    from vgrt.export.spec import unet_spec
    from vgrt.models.features import parse_features

    return unet_spec(get_preset("tiny"), parse_features(features), "float32", num_blocks=2)


@pytest.fixture
def stub_composer(monkeypatch):
    """Composer replaced by a stand-in whose UNet runners are stubs, opened through the runner hook on first
    use as the Composer's are; `made` counts the composers made. Returns (the plain UNet's spec, made)."""
    made = []

    class StubComposer:
        def __init__(self, source, backend, cache=None, progress=True, runner_hook=None):
            self.hook, self.unets = runner_hook, {}
            made.append(self)

        def runner(self, component, features="none"):
            if features not in self.unets:
                self.unets[features] = self.hook("unet", StubRunner(tiny_unet_spec(features)).activate())
            return self.unets[features]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr("vgrt.runtime.composer.Composer", StubComposer)
    return tiny_unet_spec(), made


def feed_of(spec, seed: int, call: int) -> dict[str, torch.Tensor]:
    from vgrt.export.feeds import random_feed

    sizes = {**spec.profile_sizes("min"), "batch": 2, "height": 16, "width": 16, "context": 77}
    return random_feed(spec, sizes, seed=1000 * seed + call)


def stub_method(spec, calls: int = 5, fail_after: int | None = None, features: str = "none", inversions: int = 0):
    """compose(composer, request): `inversions` calls of the plain UNet, then `calls` UNet calls of the
    UNet with `features`, of known feeds, reusing one feed buffer per UNet as the methods do; raises
    KeyboardInterrupt after `fail_after` calls."""
    plain, own = tiny_unet_spec(), tiny_unet_spec(features)

    def compose(composer, request):
        steps = [("none", plain, call) for call in range(inversions)] + [(features, own, c) for c in range(calls)]
        buffers = {}
        for index, (layout, layout_spec, call) in enumerate(steps):
            if index == fail_after:
                raise KeyboardInterrupt
            feed = feed_of(layout_spec, request.seed, call)
            buffer = buffers.setdefault(layout, {name: value.clone() for name, value in feed.items()})
            for name, value in feed.items():
                buffer[name].copy_(value)
            composer.runner("unet", layout).infer(buffer)

    compose.__module__ = __name__
    return compose


def planned(spec, seeds=(0, 1), features: str = "none", **stub):
    from vgrt.calibration.capture import PlannedRun

    method = stub_method(spec, features=features, **stub)
    return [PlannedRun("stub", features, method, StubRequest(seed), seed) for seed in seeds]


def entry_key(spec, seed: int = 0, features: str = "none") -> str:
    from vgrt.calibration.dataset import layout_key

    return layout_key(planned(spec, seeds=(seed,))[0].key, features)


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
    assert list(read_set(tmp_path / "set").runs) == [entry_key(spec)]
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "set", ModelSource("tiny"), planned(spec, seeds=(0, 1), fail_after=2))
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "calibration.json",
        f"run-{entry_key(spec)}.safetensors",
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


def test_every_unet_layout_of_a_run_is_kept_with_its_feature_set(stub_composer, tmp_path):
    from vgrt.calibration.capture import capture
    from vgrt.models.source import ModelSource

    spec, made = stub_composer
    # MCA-Ctrl's shape: 4 inversion calls of the plain UNet, then 6 denoising calls of the mutual one
    runs = planned(spec, seeds=(0,), features="mutual", inversions=4, calls=6)
    calibration = capture(tmp_path / "set", ModelSource("tiny"), runs, max_samples=3)
    plain, mutual = calibration.runs.values()
    assert (plain.key, mutual.key) == (entry_key(spec, features="none"), entry_key(spec, features="mutual"))
    assert plain.run_key == mutual.run_key == runs[0].key
    # --max-samples bounds each layout: the method's own gets as many samples as when only it was kept
    assert (plain.features, plain.calls, plain.samples) == ("none", 4, 3)
    assert (mutual.features, mutual.calls, mutual.samples) == ("mutual", 6, 3)
    assert set(mutual.inputs) == {t.name for t in tiny_unet_spec("mutual").inputs}
    assert set(plain.inputs) == {t.name for t in spec.inputs}
    assert calibration.layouts("stub") == ["none", "mutual"]
    got = list(calibration.samples([plain]))
    assert torch.equal(got[-1]["sample"], feed_of(spec, 0, 3)["sample"])  # the last inversion call, a copy
    again = capture(tmp_path / "set", ModelSource("tiny"), runs, max_samples=3)
    assert again.runs == calibration.runs and len(made) == 1  # both layouts count as the run: it is skipped


def test_call_indices_count_every_layout_in_the_order_they_ran(stub_composer, tmp_path):
    from vgrt.calibration.capture import CallSelection, capture
    from vgrt.models.source import ModelSource

    spec, _ = stub_composer
    runs = planned(spec, seeds=(0,), features="mutual", inversions=4, calls=6)
    calibration = capture(tmp_path / "set", ModelSource("tiny"), runs, CallSelection.parse("every:3"))
    assert [(run.features, run.calls, run.samples) for run in calibration.runs.values()] == [
        ("none", 4, 2),  # calls 0 and 3
        ("mutual", 6, 2),  # calls 6 and 9
    ]


def test_every_feature_set_is_read_from_its_unet_spec():
    from vgrt.calibration.capture import _feature_sets, unet_features
    from vgrt.models.features import features_text

    feature_sets = _feature_sets()
    assert len(feature_sets) > 20 and feature_sets[0] == frozenset()
    for features in feature_sets:
        spec = tiny_unet_spec(features_text(features))
        assert unet_features(spec, get_preset("tiny")) == features_text(features)


def test_a_set_of_the_first_format_reads_with_the_same_meaning(stub_composer, tmp_path):
    """A set written before runs kept every layout (one entry per run, keyed by the run, no `run` field, as
    /work/sd15/int8-mca-ctrl-calibration) reads as that run's own layout, and a re-run skips its runs."""
    import json

    from vgrt.calibration.capture import capture
    from vgrt.calibration.dataset import read_set
    from vgrt.models.source import ModelSource

    spec, made = stub_composer
    runs = planned(spec, seeds=(0,), features="mutual", inversions=2, calls=3)
    capture(tmp_path / "set", ModelSource("tiny"), runs)
    manifest = tmp_path / "set" / "calibration.json"
    data = json.loads(manifest.read_text())
    plain, mutual = data["runs"].values()
    (tmp_path / "set" / plain["shard"]).unlink()
    old_shard = f"run-{runs[0].key}.safetensors"
    (tmp_path / "set" / mutual["shard"]).rename(tmp_path / "set" / old_shard)
    del mutual["run"]
    old = {"format_version": 1, "model": data["model"], "runs": {runs[0].key: {**mutual, "key": runs[0].key,
           "shard": old_shard}}}  # fmt: skip
    manifest.write_text(json.dumps(old))
    (run,) = read_set(tmp_path / "set").runs.values()
    assert (run.key, run.run_key, run.features, run.samples) == (runs[0].key, runs[0].key, "mutual", 3)
    assert len(list(read_set(tmp_path / "set").samples())) == 3
    again = capture(tmp_path / "set", ModelSource("tiny"), runs)
    assert list(again.runs) == [runs[0].key] and len(made) == 1
