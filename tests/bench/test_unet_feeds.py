"""`vgrt bench unet --feeds SET`: the conditioned UNet against the plain one on captured feeds, one feed per
phase (sizes and gates), each phase's ratio and the ratios weighted by calls.

The set is written directly (as a capture writes it) from seeded feeds of the tiny conditioned export, so
the test times engines, not a method run: method alpha at batch 2 with its gates off and then on, method
beta at batch 1, and a run of the plain layout that does not fit the conditioned export."""

import pytest

from tests.bench.helpers import run_bench
from vgrt.cli import main

BACKENDS = ("torch", "onnxruntime")


def write_set(directory, runs):
    """runs: (method, calls, features, feeds) -> a calibration set at `directory`, one run each."""
    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.models.source import ModelSource

    with open_for_capture(directory, model_identity(ModelSource("tiny"))) as writer:
        for method, calls, features, feeds in runs:
            inputs = {name: {"dtype": "float32" if v.is_floating_point() else "int64", "shape": list(v.shape)}
                      for name, v in feeds[0].items()}  # fmt: skip
            run = CapturedRun(f"{method}-0", method, 0, 4, (128, 128), features, inputs, calls, len(feeds), "", 0, "")
            writer.add_run(run, feeds)
    return directory


@pytest.fixture(scope="module")
def feeds_set(tiny_export, tmp_path_factory):
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest

    conditioned, plain = tiny_export(features="all"), tiny_export()
    unet = read_manifest(conditioned).component("unet")
    features = ",".join(unet.features)

    def feeds(batch: int, seeds: range, gates: float) -> list[dict]:
        found = [random_feed(unet.spec, {**unet.spec.profile_sizes("opt"), "batch": batch}, seed=s) for s in seeds]
        for feed in found:
            feed["layer_gates"].fill_(gates)
        return found

    plain_feeds = [{k: v for k, v in feed.items() if k in ("sample", "timestep", "encoder_hidden_states")}
                   for feed in feeds(2, range(1), 1.0)]  # fmt: skip
    runs = [
        ("alpha", 8, features, feeds(2, range(2), 0.0) + feeds(2, range(2, 4), 1.0)),  # each feed: 2 of 8 calls
        ("beta", 2, features, feeds(1, range(2), 1.0)),
        ("text", 1, "none", plain_feeds),
    ]
    return conditioned, plain, write_set(tmp_path_factory.mktemp("feeds") / "set", runs)


@pytest.fixture(scope="module")
def feeds_run(feeds_set, tmp_path_factory):
    conditioned, plain, calibration = feeds_set
    return run_bench(
        "unet", "--feeds", str(calibration), "--export-dir", str(conditioned), "--plain-export-dir", str(plain),
        "--backends", ",".join(BACKENDS), "--repeats", "1", out=tmp_path_factory.mktemp("bench-feeds"),
    )  # fmt: skip


def test_one_feed_per_phase_is_timed_against_the_plain_unet_at_its_sizes(feeds_run):
    run, stdout, _ = feeds_run
    phases = {(p["sizes"]["batch"], tuple(p["gates_on"])): p for p in run["details"]["phases"]}
    assert set(phases) == {(2, ()), (2, ("extra_tokens", "mutual")), (1, ("extra_tokens", "mutual"))}
    assert phases[(2, ())]["samples"] == 2 and phases[(2, ())]["calls"] == {"alpha": 4.0}
    assert phases[(1, ("extra_tokens", "mutual"))]["calls"] == {"beta": 2.0}
    assert list(run["details"]["runs_left_out"]) == ["text-0"]  # the plain layout does not fit the export
    kinds = [(case["params"]["unet"], case["params"]["batch"]) for case in run["cases"]]
    assert sorted(kinds) == [("conditioned", 1), ("conditioned", 2), ("conditioned", 2), ("plain", 1), ("plain", 2)]
    for case in run["cases"]:
        assert [r["backend"] for r in case["results"]] == list(BACKENDS)
        for result in case["results"]:  # one round: one sample and one child's peak memory each
            assert len(result["samples_s"]) == len(result["peak_rss_bytes"]) == 1
            assert result["peak_rss_bytes"][0] > 100 * 2**20  # torch alone is more than that
        assert case["results"][1]["relative_error"] < 1e-4  # the same model on the same captured feed
    opened = run["details"]["children"]["open_s"]  # every case's children, one per backend and round
    assert set(opened) == {case["label"] for case in run["cases"]}
    assert all(set(by_backend) == set(BACKENDS) for by_backend in opened.values())
    assert "Conditioned over plain UNet on the captured feeds" in stdout and "alpha, weighted by calls" in stdout


def test_ratios_per_phase_and_weighted_by_calls(feeds_run):
    run, _, _ = feeds_run
    median = {(case["label"], r["backend"]): r["median_s"] for case in run["cases"] for r in case["results"]}
    weighted = run["details"]["conditioned_over_plain_weighted"]
    assert set(weighted) == {"all", "alpha", "beta"}
    for backend in BACKENDS:
        conditioned = plain = 0.0
        for phase in run["details"]["phases"]:
            ratio = median[phase["label"], backend] / median[phase["plain"], backend]
            assert phase["conditioned_over_plain"][backend] == pytest.approx(ratio)
            calls = sum(phase["calls"].values())
            conditioned += calls * median[phase["label"], backend]
            plain += calls * median[phase["plain"], backend]
            if "beta" in phase["calls"]:  # beta has one phase: its weighted ratio is that phase's
                assert weighted["beta"][backend] == pytest.approx(ratio)
        assert weighted["all"][backend] == pytest.approx(conditioned / plain)


def test_a_set_no_run_of_which_fits_the_export_is_refused_before_any_timing(feeds_set, tmp_path, capsys):
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest

    conditioned, plain, _ = feeds_set
    feed = random_feed(read_manifest(plain).component("unet").spec)
    calibration = write_set(tmp_path / "set", [("text", 1, "none", [feed])])
    args = ["--feeds", str(calibration), "--export-dir", str(conditioned), "--plain-export-dir", str(plain)]
    assert main(["bench", "unet", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no run of the --feeds set" in err and "text was captured with the inputs" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plain-export-dir", "{plain}"], "give --feeds SET too"),
        (["--feeds", "{set}", "--batch", "1"], "does not take --batch"),
        (["--feeds", "{set}", "--plain-export-dir", "{conditioned}"], "the plain UNet has none"),
        (["--feeds", "{set}", "--preset", "sd15"], "--preset is sd15 and the --feeds set"),
        (["--feeds", "{plain}"], "holds no calibration set"),
    ],
)
def test_feeds_options_are_checked_before_any_work(feeds_set, args, message, tmp_path, capsys):
    conditioned, plain, calibration = feeds_set
    paths = {"conditioned": conditioned, "plain": plain, "set": calibration}
    args = [arg.format(**paths) for arg in args]
    assert main(["bench", "unet", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
