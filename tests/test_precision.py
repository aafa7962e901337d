"""One --precision from export to run: which backend runs which precision, and what each asks of the export."""

from pathlib import Path

import pytest

from vgrt.cli import main
from vgrt.errors import InvalidInputError
from vgrt.precision import (
    BACKENDS_OF,
    PRECISIONS,
    check_precision,
    default_precision,
    export_dtype,
    precision_settings,
)


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


@pytest.mark.parametrize(
    "precision, calibrated, message",
    [
        ("int8", (), "--precision int8 runs an export calibrated by `vgrt calibrate`: give its --out with"),
        ("fp32", ("int8",), "--calibrated runs a quantised UNet, and --precision is fp32: add --precision int8"),
        ("fp8", ("int8",), "--precision fp8 does not run on the openvino backend; it runs on: tensorrt"),
    ],
)
def test_calibrated_exports_go_with_int8_and_fp8_only(precision, calibrated, message):
    with pytest.raises(InvalidInputError, match=message):
        precision_settings(precision, "openvino", calibrated)


def test_each_precision_runs_its_exports_and_the_calibrated_unets():
    calibrated = (Path("a"), Path("b"))
    assert precision_settings("int8", "tensorrt", ["a", "b"]) == {"dtype": "fp16", "calibrated": calibrated}
    assert precision_settings("bf16", "openvino") == {"dtype": "fp32", "calibrated": ()}  # bf16 runs the fp32 export
    assert precision_settings("fp16", "onnxruntime") == {"dtype": "fp16", "calibrated": ()}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_compose_suite_runs_int8_as_vgrt_compose_does(backend, tmp_path, monkeypatch):
    """The suite's int8 competitors and `vgrt compose --precision int8 --calibrated DIR` share their settings."""
    from vgrt.bench.compose_int8 import composer_options as suite_options
    from vgrt.commands.compose import composer_options

    monkeypatch.setattr("vgrt.engines.engine_set.check_calibrated", lambda folders, backend: None)  # no export on disk
    folder = str(tmp_path / "int8")
    compose = composer_options(backend, None, None, "int8", [folder])
    shared = {"dtype": compose["dtype"], "calibrated": compose["calibrated"]}
    assert suite_options(backend, [folder]) == shared == {"dtype": "fp32", "calibrated": (Path(folder),)}
