"""`vgrt bench unet --quantised DIR`: the INT8 export of `vgrt calibrate` timed beside the float competitors,
in the same interleaved run, with its error against PyTorch fp32."""

import pytest

from tests.bench.helpers import results_by_backend, run_bench
from vgrt.cli import main


@pytest.fixture(scope="module")
def int8_export(synthetic_set, tmp_path_factory):
    from vgrt.calibration.int8 import Int8Settings, quantize_export

    export, calibration = synthetic_set
    out, _ = quantize_export(export, calibration, tmp_path_factory.mktemp("int8") / "unet", Int8Settings(None))
    return export, out


def test_the_int8_export_is_timed_against_the_float_competitors(int8_export, tmp_path):
    export, quantised = int8_export
    run, stdout, _ = run_bench(
        "unet", "--quick", "--backends", "onnxruntime,onnxruntime-int8,openvino-int8",
        "--export-dir", str(export), "--quantised", str(quantised), out=tmp_path,
    )  # fmt: skip
    by_backend = results_by_backend(run)
    assert set(by_backend) == {"torch", "onnxruntime", "onnxruntime-int8", "openvino-int8"}
    assert by_backend["onnxruntime"][0]["max_abs_diff"] < 1e-4
    for backend in ("onnxruntime-int8", "openvino-int8"):  # quantised: an error above fp32 round-off, still close
        (result,) = by_backend[backend]
        assert 1e-4 < result["max_abs_diff"] < 1.0 and result["ratio_to_torch"] > 0
    assert "onnxruntime-int8" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "openvino-int8", "--export-dir", "{float}"], "give it with --quantised DIR"),
        (["--backends", "onnxruntime", "--export-dir", "{float}", "--quantised", "{int8}"], "add one to --backends"),
        (["--backends", "openvino-int8", "--quantised", "{float}"], "not an INT8 one"),
        (
            ["--backends", "openvino-int8", "--export-dir", "{other}", "--quantised", "{int8}"],
            "give the export of the same model",
        ),
    ],
)
def test_int8_competitors_and_their_export_are_checked_before_any_work(
    args, message, int8_export, tiny_export, tmp_path, capsys
):
    export, quantised = int8_export
    paths = {"float": export, "int8": quantised, "other": tiny_export(features="all")}
    args = [arg.format(**paths) for arg in args]
    assert main(["bench", "unet", "--quick", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written
