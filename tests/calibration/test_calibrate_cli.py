"""`vgrt calibrate`: bad input is refused with a message before anything is captured or quantised."""

import pytest

from vgrt.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """Capture and quantisation fail the test if reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr("vgrt.calibration.capture.capture", refuse)
    monkeypatch.setattr("vgrt.calibration.int8.quantize_export", refuse)
    monkeypatch.setattr("vgrt.calibration.tensorrt_qdq.quantize_for_tensorrt", refuse)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--precision", "fp8"], "--precision fp8 is TensorRT's (Hopper and Ada GPUs); add --target tensorrt"),
        (["--max-samples", "0"], "--max-samples must be >= 1, got 0"),
        (["--calls", "every:0"], "--calls 'every:0' is not 'all', 'every:K'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--seeds", "a,b"], "--seeds 'a,b' is not comma-separated whole numbers"),
        (["--preset", "sd99"], "sd99"),
        (["--capture-only", "--from-set"], "--from-set and --capture-only exclude each other"),
        (["--smoothquant", "0.5,2"], "--smoothquant '0.5,2' is not comma-separated numbers in [0, 1]"),
        (["--target", "tensorrt", "--int8-attention"], "--int8-attention is for --target cpu"),
        (["--target", "tensorrt", "--reduce-range"], "--reduce-range is for --target cpu"),
        (["--features", "mutal"], "unknown feature(s) 'mutal'"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, no_work, extra, message):
    code = main(["calibrate", "vcf", "--out", str(tmp_path / "int8"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "int8").exists() and not (tmp_path / "int8-calibration").exists()


def test_out_is_required_unless_only_capturing(capsys, no_work):
    assert main(["calibrate", "vcf"]) == 2
    assert "give --out DIR, the INT8 export to write" in capsys.readouterr().err


def test_a_foreign_out_folder_is_refused_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["calibrate", "vcf", "--out", str(tmp_path / "mine")]) == 2
    assert "is a folder that is not a vgrt export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_method_input_error_names_the_option(tmp_path, capsys, no_work):
    code = main(["calibrate", "vcf", "--prompt", "a ball", "--out", str(tmp_path / "int8")])  # no --reference
    assert code == 2
    assert "--reference is required" in capsys.readouterr().err


def test_from_set_without_a_set_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vgrt.calibration.int8.quantize_export", pytest.fail)
    code = main(["calibrate", "vcf", "--from-set", "--set", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "holds no calibration set" in capsys.readouterr().err


def test_int8_attention_and_reduce_range_from_a_set_reach_the_manifest(masked_set, tmp_path, capsys, monkeypatch):
    from vgrt.export.manifest import read_manifest

    export, calibration = masked_set
    monkeypatch.setattr("vgrt.export.cache.cached_export", lambda settings, cache: export)  # the session's export
    out = tmp_path / "int8"
    args = ["calibrate", "locref", "--from-set", "--set", str(calibration), "--out", str(out), "--int8-attention"]
    assert main([*args, "--reduce-range"]) == 0
    printed = capsys.readouterr().out
    assert "attentions without a mask in int8" in printed and "7-bit weights" in printed
    quantization = read_manifest(out).data["quantization"]
    assert quantization["int8_attention"]["ranges"] and "Attention (without a mask)" in quantization["quantised_ops"]
    assert quantization["reduce_range"] is True


@pytest.mark.slow
def test_calibrate_captures_quantises_and_reports(tmp_path, capsys, composer_cache):
    from vgrt.engines import open_runner
    from vgrt.export.manifest import read_manifest

    out = tmp_path / "int8"
    args = [
        "calibrate",
        "vcf",
        "--steps",
        "4",
        "--example-size",
        "32",
        "--out",
        str(out),
        "--cache",
        str(composer_cache),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "captured 8 samples" in printed and "UNet output relative error vs fp32" in printed
    assert "vcf seed 0: int8" in printed and "vcf seed 1: int8" in printed  # the quality report, per run
    manifest = read_manifest(out)
    assert manifest.precision == "int8" and manifest.data["quantization"]["calibration"]["samples"] == 8
    with open_runner(out, backend="onnxruntime"):
        pass
    assert main(args) == 0  # a re-run resumes: the set is complete, only the quantisation runs again
    assert "captured 8 samples" in capsys.readouterr().out
