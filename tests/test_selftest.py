"""`vgrt selftest`: its CPU mode runs here so it cannot rot (the kernel under Triton's interpreter, the
methods on torch against onnxruntime); the GPU mode's refusal without a GPU, its speed targets and its
JSON report."""

import json

import pytest
import torch

from vgrt import selftest
from vgrt.cli import main
from vgrt.selftest import FAILED, OK, SKIPPED, AttentionSize, Check, Report


def test_kernel_checks_pass_under_the_interpreter():
    pytest.importorskip("triton")
    checks = list(selftest._kernel_checks(gpu=False))
    assert len(checks) == 2 * len(selftest.CPU_SIZES)
    assert all(c.status == OK for c in checks), [(c.name, c.detail) for c in checks if c.status != OK]
    masked = [c for c in checks if c.name.endswith("masked")]
    assert all(c.values["plugin_max_abs_diff"] <= c.values["tolerance"] for c in masked)


def test_half_the_key_tiles_are_masked():
    from vgrt.plugins.masked_attention.triton_kernel import BLOCK_M, BLOCK_N, block_mask_from_bias

    size = AttentionSize("sd15", 2, 8, 4096, 40)
    bias = selftest.half_masked_key_bias(size, torch.float32, "cpu")
    tiles = block_mask_from_bias(bias, size.tokens, size.tokens)
    assert tiles.shape == (2, 1, 4096 // BLOCK_M, 4096 // BLOCK_N) and tiles.float().mean().item() == 0.5


def test_a_failing_method_is_reported_and_the_others_still_run(monkeypatch):
    def compose_benchmark(name, preset, backend, device):
        if name == "vcf":
            raise RuntimeError("boom")
        return torch.zeros(1, 3, 8, 8) + (0.5 if backend == "torch" and name == "locref" else 0.0)

    monkeypatch.setattr(selftest, "compose_benchmark", compose_benchmark)
    checks = {c.name.split()[1]: c for c in selftest._method_checks(False, ("vcf", "locref", "aicomposer"), "tiny")}
    assert (checks["vcf"].status, checks["vcf"].detail) == (FAILED, "RuntimeError: boom")
    assert checks["locref"].status == FAILED and "differ by 0.5" in checks["locref"].detail
    assert checks["aicomposer"].status == OK and checks["aicomposer"].values["max_abs_diff"] == 0.0
    assert checks["aicomposer"].name == "method aicomposer torch/cpu vs onnxruntime/cpu"


def _timed(label, kernel_s, sdpa_s, masked_s, plugin_s):
    return [
        Check(f"kernel {label} dense", OK, values={"kernel_s": kernel_s, "sdpa_s": sdpa_s}),
        Check(f"kernel {label} half the key tiles masked", OK, values={"kernel_s": masked_s, "plugin_s": plugin_s}),
    ]


def test_speed_targets():
    checks = [*_timed("fast", 1.0, 1.2, 0.4, 0.45), *_timed("slow", 1.0, 0.8, 0.7, 0.6)]
    fast, slow = selftest.speed_checks(checks)
    assert (fast.name, fast.status) == ("speed fast", OK)
    assert fast.values == pytest.approx(
        {"dense_to_sdpa": 1 / 1.2, "masked_to_dense": 0.4, "plugin_masked_to_dense": 0.45}
    )
    assert slow.status == FAILED
    assert "dense kernel 1.25x SDPA" in slow.detail and "masked 0.70x the dense kernel" in slow.detail


def test_report_json(tmp_path):
    report = Report("cpu", [Check("kernel x", OK, "fine", {"kernel_max_abs_diff": 0.0}), Check("tensorrt", SKIPPED)])
    path = selftest.write_report(report, tmp_path / "results")
    data = json.loads(path.read_text())
    assert path.name.startswith("selftest-cpu-") and data["suite"] == "selftest" and data["mode"] == "cpu"
    assert data["checks"][0] == {
        "name": "kernel x",
        "status": OK,
        "detail": "fine",
        "values": {"kernel_max_abs_diff": 0.0},
    }
    assert {"machine", "versions", "created", "targets"} <= set(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_mode_without_a_gpu_says_what_to_do(capsys):
    assert main(["selftest", "--gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_unknown_method_is_refused(capsys, tmp_path):
    pytest.importorskip("triton")
    assert main(["selftest", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method benchmark(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow  # exports LocRef's components for onnxruntime: minutes on a busy 2-core machine
def test_cpu_mode_runs_a_method_end_to_end(tmp_path, capsys, composer_cache, monkeypatch):
    """The CLI in CPU mode on one method: the kernel checks, then LocRef on torch against onnxruntime."""
    pytest.importorskip("triton")
    monkeypatch.setenv("VGRT_CACHE", str(composer_cache))
    assert main(["selftest", "--methods", "locref", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok       method locref torch/cpu vs onnxruntime/cpu" in out and "0 failed" in out
    (report,) = tmp_path.glob("selftest-cpu-*.json")
    assert [c["status"] for c in json.loads(report.read_text())["checks"]] == [OK] * (2 * len(selftest.CPU_SIZES) + 1)


def test_a_method_benchmark_composes_on_torch(composer_cache, monkeypatch):
    """The glue the method checks run through (registry benchmark, example images, Composer on a device)."""
    monkeypatch.setenv("VGRT_CACHE", str(composer_cache))
    image = selftest.compose_benchmark("locref", "tiny", backend="torch", device="cpu")
    assert image.shape == (1, 3, 16, 16) and image.isfinite().all()


@pytest.mark.slow  # every method, exported for onnxruntime and run on both backends: minutes on 2 cores
def test_cpu_mode_every_method(composer_cache, monkeypatch):
    monkeypatch.setenv("VGRT_CACHE", str(composer_cache))
    report = selftest.run_selftest(gpu=False)
    assert report.failed == [] and len(report.checks) > 2 * len(selftest.CPU_SIZES)
