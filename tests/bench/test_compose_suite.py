"""`vgrt bench compose --quick` on the tiny preset: each method's stages timed on both backends, with the
host work per UNet step; every method entry's request; and the charging of UNet calls to stages.

The end-to-end run takes MCA-Ctrl (inversion and denoising) and LocRef (denoising alone); the other
entries are checked up to their validated request, which needs no engine."""

import pytest

from tests.bench.helpers import run_bench
from vgrt.bench.compose_methods import METHODS, Inputs
from vgrt.bench.unet_calls import StageCalls, UNetCallLog

TIMED = ("mca-ctrl", "locref")


@pytest.fixture(scope="module")
def compose_run(composer_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-compose")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VGRT_CACHE", str(composer_cache))  # the engines the method tests export, shared
        return run_bench("compose", "--quick", "--backends", "torch,onnxruntime", "--methods", ",".join(TIMED), out=out)


def cases_of(run: dict, method: str) -> dict[str, dict]:
    return {case["params"]["stage"]: case for case in run["cases"] if case["params"]["method"] == method}


def test_every_method_and_stage_has_samples_and_a_ratio_per_backend(compose_run):
    run, stdout, png = compose_run
    repeats, steps = run["settings"]["timing"]["repeats"], run["settings"]["steps"]
    assert {case["params"]["method"] for case in run["cases"]} == set(TIMED)
    for method in TIMED:
        stages = cases_of(run, method)
        assert {"encode", "denoise", "decode", "total"} <= set(stages)
        for case in stages.values():
            assert case["params"]["preset"] == "tiny" and case["params"]["steps"] == steps
            assert [r["backend"] for r in case["results"]] == ["torch", "onnxruntime"]
            for result in case["results"]:
                assert len(result["samples_s"]) == repeats and all(s > 0 for s in result["samples_s"])
                assert result["ratio_to_torch"] > 0
        assert stages["total"]["results"][1]["max_abs_diff"] < 1e-3  # both backends composed the same latents
    assert "invert" in cases_of(run, "mca-ctrl")
    assert png.name.startswith("compose-tiny-") and png.stat().st_size > 0
    assert "| stage |" in stdout and "host % of UNet call" in stdout


def test_host_overhead_of_the_stages_that_call_the_unet(compose_run):
    run, _, _ = compose_run
    steps, repeats = run["settings"]["steps"], run["settings"]["timing"]["repeats"]
    for method in TIMED:
        for stage, case in cases_of(run, method).items():
            for result in case["results"]:
                if stage in ("invert", "denoise"):
                    host = result["host_overhead"]
                    assert host["unet_calls"] == steps  # one UNet call per step, guidance batched into it
                    assert len(host["host_percent_of_unet_call"]) == repeats
                    assert all(s >= 0 for s in host["host_per_step_s"]) and host["unet_call_median_s"] > 0
                else:
                    assert "host_overhead" not in result
    assert run["details"]["methods"][f"locref tiny {cases_of(run, 'locref')['total']['params']['image']}"]["request"]


@pytest.mark.parametrize("steps", [2, 20])
def test_every_method_entry_builds_a_valid_request(steps):
    inputs = Inputs.make(32)
    for name, build in METHODS.items():
        compose, request = build(inputs, steps)
        assert callable(compose) and request.steps == steps, name
        request.validate()


def test_unet_calls_are_charged_to_the_innermost_stage_they_started_in():
    log = UNetCallLog()
    log.calls += [(1.5, 0.25), (2.5, 0.5), (3.5, 0.25), (5.2, 0.1), (5.7, 0.1), (9.0, 1.0)]  # the last: no stage
    spans = [
        ("invert", 1.0, 3.0),
        ("guidance", 5.5, 5.9),  # a gradient stage timed inside the denoising loop, with its own UNet call
        ("denoise", 3.0, 4.0),
        ("denoise", 5.0, 6.0),
        ("decode", 6.0, 7.0),
    ]
    assert log.by_stage(spans) == {
        "invert": StageCalls(2, 0.75, own_seconds=2.0),
        "denoise": StageCalls(2, pytest.approx(0.35), own_seconds=pytest.approx(1.6)),
        "guidance": StageCalls(1, 0.1, own_seconds=pytest.approx(0.4)),
        "decode": StageCalls(own_seconds=1.0),
    }
