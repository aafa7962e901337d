"""One --precision from export to run: which backend runs which precision, and what each asks of the export."""

import pytest

from vgrt.cli import main
from vgrt.errors import InvalidInputError
from vgrt.precision import BACKENDS_OF, PRECISIONS, check_precision, default_precision, export_dtype


def test_every_precision_names_its_backends_and_export():
    assert set(BACKENDS_OF) == set(PRECISIONS)
    assert [export_dtype(p) for p in ("fp32", "fp16", "bf16")] == ["fp32", "fp16", "fp32"]  # bf16 runs the fp32 graph
    assert (default_precision("tensorrt"), default_precision("openvino")) == ("fp16", "fp32")


@pytest.mark.parametrize(
    "precision, backend, message",
    [
        ("fp64", None, "unknown --precision 'fp64'; choose one of: fp32, fp16, bf16, int8, fp8"),
        ("bf16", "onnxruntime", "--precision bf16 does not run on the onnxruntime backend; it runs on: openvino"),
        ("fp16", "openvino", "--precision fp16 does not run on the openvino backend; it runs on: torch, onnxruntime"),
    ],
)
def test_a_precision_the_backend_does_not_run_is_refused(precision, backend, message):
    with pytest.raises(InvalidInputError, match=message):
        check_precision(precision, backend)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_export_sends_calibrated_precisions_to_vgrt_calibrate(precision, tmp_path, capsys):
    assert main(["export", "--precision", precision, "--out", str(tmp_path / "export")]) == 2
    assert f"--precision {precision}: int8 and fp8 engines come from an export calibrated" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
