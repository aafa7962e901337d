"""`vgrt doctor` reports what this machine really has: versions that import, reasons for what is missing,
and a check that raises as a failure with its message while the other checks still report."""

import importlib.util
import json
import sys

import pytest
import torch

from vgrt import doctor
from vgrt.cli import main
from vgrt.engines.cpu_features import read_cpu_features


def report(capsys) -> dict[str, dict[str, object]]:
    assert main(["doctor", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_check_reports(capsys):
    assert list(report(capsys)) == list(doctor.CHECKS)


def test_versions_are_the_installed_ones(capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    entries = report(capsys)
    assert entries["torch"] == {"ok": True, "detail": torch.__version__}
    assert entries["onnxruntime"]["ok"] is True
    assert entries["onnxruntime"]["detail"].startswith(f"{onnxruntime.__version__}, providers: ")
    assert "CPUExecutionProvider" in entries["onnxruntime"]["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_gpu_is_reported_with_the_reason(capsys):
    entries = report(capsys)
    assert entries["gpu"] == {
        "ok": False,
        "detail": f"no CUDA device visible to torch {torch.__version__} (a CPU build, or no driver)",
    }


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_missing_tensorrt_is_reported_with_what_to_install(capsys):
    entries = report(capsys)
    install = "not installed: pip install 'vgrt[trt]' (needs NVIDIA's library download to succeed)"
    assert entries["tensorrt"] == {"ok": False, "detail": install}
    assert entries["masked-attention plugin"] == {"ok": False, "detail": f"needs TensorRT ({install})"}


def test_a_check_that_raises_is_a_failure_with_its_message(monkeypatch, capsys):
    def broken() -> tuple[bool, str]:
        raise RuntimeError("libonnxruntime.so: undefined symbol")

    monkeypatch.setitem(doctor.CHECKS, "onnxruntime", broken)
    message = "check raised RuntimeError: libonnxruntime.so: undefined symbol"
    entries = report(capsys)
    assert entries["onnxruntime"] == {"ok": False, "detail": message}
    assert entries["torch"] == {"ok": True, "detail": torch.__version__}  # the others still report
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(doctor.CHECKS)
    line = next(line for line in lines if line[3:].startswith("onnxruntime "))
    assert line.startswith("-- ") and line.endswith(message)


def test_an_installed_package_that_fails_to_import_says_how(tmp_path, monkeypatch):
    (tmp_path / "needs_a_dependency.py").write_text("import vgrt_test_absent_dependency\n")
    (tmp_path / "broken_inside.py").write_text("raise ImportError('cannot import name X from y')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "vgrt_test_hidden", None)  # what an uninstalled package looks like
    assert doctor._import("vgrt_test_hidden") == (None, "not installed")
    assert doctor._import("needs_a_dependency") == (
        None,
        "installed but does not import: No module named 'vgrt_test_absent_dependency'",
    )
    assert doctor._import("broken_inside") == (
        None,
        "installed but does not import: ImportError: cannot import name X from y",
    )


def test_cpu_features_name_the_units_each_precision_finds(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")  # fmt: skip
    features = read_cpu_features(cpuinfo)
    assert (features.model, features.bf16, features.int8) == ("Some CPU", False, True)
    assert features.describe().endswith("fp32: AVX512F+AVX2, bf16: no units (emulated), int8: AVX512_VNNI")


def test_cpu_without_cpuinfo_says_so(tmp_path):
    features = read_cpu_features(tmp_path / "absent")
    assert features.bf16 is None and features.int8 is None
    assert "instruction sets unknown" in features.describe()


def test_doctor_reports_this_cpu(capsys):
    assert report(capsys)["cpu"] == {"ok": True, "detail": read_cpu_features().describe()}
