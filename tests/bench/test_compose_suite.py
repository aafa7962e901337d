"""`vgrt bench compose --quick` on the tiny preset: each method's stages timed on both backends, with the
host work per UNet step; every method entry's request; and the charging of UNet calls to stages.

The end-to-end run takes MCA-Ctrl (inversion and denoising), LocRef (denoising alone) and VCF with two
PNO iterations (a gradient stage); the other entries are checked up to their validated request, which
needs no engine."""

import pytest

from tests.bench.helpers import run_bench
from vgrt.bench.compose_methods import METHODS, bench_request, example_images, gradient_steps
from vgrt.bench.compose_suite import BackendRuns, RunRecord, _gradient_shares
from vgrt.bench.unet_calls import StageCalls, UNetCallLog
from vgrt.models.presets import get_preset, vision_tokens
from vgrt.runtime.methods.registry import Work
from vgrt.runtime.methods.vcf import check_context_fits, fused_length

TIMED = ("mca-ctrl", "locref", "vcf-pno")
BACKENDS = ("torch", "onnxruntime", "openvino")
PNO_ITERATIONS = 2


@pytest.fixture(scope="module")
def compose_run(composer_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-compose")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VGRT_CACHE", str(composer_cache))  # the engines the method tests export, shared
        methods = ",".join(TIMED)
        gradient = ("--gradient-steps", str(PNO_ITERATIONS))
        return run_bench(
            "compose", "--quick", "--backends", ",".join(BACKENDS), "--methods", methods, *gradient, out=out
        )


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
            assert [r["backend"] for r in case["results"]] == list(BACKENDS)
            for result in case["results"]:
                assert len(result["samples_s"]) == repeats and all(s > 0 for s in result["samples_s"])
                assert result["ratio_to_torch"] > 0
        for result in stages["total"]["results"][1:]:
            assert result["max_abs_diff"] < 1e-3  # every backend composed the same latents
        image = stages["total"]["params"]["image"]
        for backend in BACKENDS[1:]:
            assert 0 < run["details"]["methods"][f"{method} tiny {image}"]["latents_vs_torch"][backend] < 1e-4
    assert "invert" in cases_of(run, "mca-ctrl") and "pno" in cases_of(run, "vcf-pno")
    assert png.name.startswith("compose-tiny-") and png.stat().st_size > 0
    assert "| stage |" in stdout and "host % of UNet call" in stdout
    assert run["details"]["settings"]["openvino"] == {"precision": "fp32", "threads": run["settings"]["threads"]}


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


def test_gradient_steps_have_their_time_per_step_and_pytorch_share(compose_run):
    run, _, _ = compose_run
    repeats = run["settings"]["timing"]["repeats"]
    image = cases_of(run, "vcf-pno")["total"]["params"]["image"]
    assert list(run["details"]["gradient"]) == [f"vcf-pno tiny {image}"]  # the other methods have no gradient stage
    assert run["details"]["methods"][f"vcf-pno tiny {image}"]["request"]["pno"]["iterations"] == PNO_ITERATIONS
    shares = run["details"]["gradient"][f"vcf-pno tiny {image}"]
    pno_seconds = {r["backend"]: r["samples_s"] for r in cases_of(run, "vcf-pno")["pno"]["results"]}
    for backend in BACKENDS:
        pno = shares[backend]["pno"]
        assert pno["steps"] == PNO_ITERATIONS and len(pno["seconds_per_step"]) == repeats
        assert pno["seconds_per_step"] == pytest.approx([s / PNO_ITERATIONS for s in pno_seconds[backend]])
        assert all(0 < share < 1 for share in pno["pytorch_share_of_total"])


@pytest.fixture(scope="module")
def tiny_examples():
    with example_images(get_preset("tiny"), 32) as examples:
        yield examples


@pytest.mark.parametrize("steps", [2, 20])
def test_every_method_entry_builds_a_valid_request(tiny_examples, steps):
    assert set(METHODS) >= {"mca-ctrl", "aicomposer", "locref", "vcf", "vcf-pno", "visual-prompts"}
    for name in METHODS:
        compose, request = bench_request(name, tiny_examples, Work(steps))
        assert callable(compose) and request.steps == steps, name


def test_gradient_steps_reach_the_requests_and_are_counted(tiny_examples):
    def counted(name: str, work: Work) -> dict[str, int]:
        return gradient_steps(bench_request(name, tiny_examples, work)[1])

    assert counted("vcf-pno", Work(4)) == {"pno": 10}  # PnoSettings' default
    assert counted("vcf-pno", Work(4, gradient_steps=3)) == {"pno": 3}
    assert counted("visual-prompts", Work(4)) == {"guidance": 4}  # capped at the steps
    assert counted("visual-prompts", Work(8, gradient_steps=2)) == {"guidance": 2}
    for name in ("mca-ctrl", "aicomposer", "locref", "vcf"):
        assert counted(name, Work(4, gradient_steps=3)) == {}, name


@pytest.mark.parametrize("preset, tokens", [("tiny", "all"), ("sd15", "cls"), ("sd21", "all")])
def test_the_vcf_entry_fuses_what_the_unet_profile_takes(preset, tokens):
    model = get_preset(preset)
    size = model.profile.latent.min * model.vae_factor
    with example_images(model, size) as examples:
        _, request = bench_request("vcf", examples, Work(2))
    assert request.tokens == tokens
    check_context_fits(fused_length(request, 77, vision_tokens(model.image_encoder)), model.profile.context)


def test_gradient_shares_per_step_and_of_the_whole_call():
    records = [RunRecord(10.0, {"encode": 1.0, "pno": 6.0, "denoise": 3.0}, {}),
               RunRecord(20.0, {"encode": 1.0, "pno": 15.0, "denoise": 4.0}, {})]  # fmt: skip
    shares = _gradient_shares({"pno": 3}, {"torch": BackendRuns(records)})
    pno = shares["torch"]["pno"]
    assert pno["steps"] == 3 and pno["seconds_per_step"] == [2.0, 5.0] and pno["seconds_per_step_median"] == 3.5
    assert pno["pytorch_share_of_total"] == [0.6, 0.75] and pno["pytorch_share_of_total_median"] == 0.675


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
