"""The CLI never shows a traceback unasked: a missing optional package is one line naming the package and
the extra (exit 2), an unexpected failure is one 'internal error' line (exit 1; -v adds the traceback),
Ctrl-C is 'interrupted' (exit 130)."""

import subprocess
import sys

import pytest

from vgrt._lazy import require
from vgrt.cli import main
from vgrt.errors import MissingDependencyError


def run_cli(*argv: str, hide: str = "", fail_with: str = "") -> subprocess.CompletedProcess:
    """`vgrt ARGV` in a fresh process; `hide` makes a module look uninstalled, `fail_with` makes the
    doctor command raise that exception expression."""
    code = "import sys\n"
    if hide:
        code += f"sys.modules[{hide!r}] = None\n"
    if fail_with:
        code += f"import vgrt.commands.doctor as d\ndef run(args): raise {fail_with}\nd.run = run\n"
    code += f"from vgrt.cli import main\nsys.exit(main({list(argv)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)


def test_export_without_onnx_names_the_package_and_the_extra(tmp_path):
    out = tmp_path / "export"
    result = run_cli("export", "--preset", "tiny", "--out", str(out), hide="onnx")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        (
            "vgrt export: error: the package 'onnx' is not installed but is needed here; "
            "install it with: pip install 'vgrt[cpu]'"
        )
    ]
    assert not out.exists()


def test_internal_error_is_one_line_and_v_shows_the_traceback():
    result = run_cli("doctor", fail_with="RuntimeError('kaput\\nsecond line')")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "vgrt doctor: internal error: RuntimeError: kaput; rerun with -v for the traceback"
    ]
    verbose = run_cli("-v", "doctor", fail_with="RuntimeError('kaput')")
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr and "in run\nRuntimeError: kaput\n" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == "vgrt doctor: internal error: RuntimeError: kaput"


def _failing_doctor(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setattr("vgrt.commands.doctor.run", run)


def test_ctrl_c_says_interrupted_and_exits_130(monkeypatch, capsys):
    _failing_doctor(monkeypatch, KeyboardInterrupt())
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err == "vgrt doctor: interrupted\n"


def test_a_missing_vgrt_module_is_an_internal_error_not_an_install_hint(monkeypatch, capsys):
    _failing_doctor(monkeypatch, ModuleNotFoundError("No module named 'vgrt.gone'", name="vgrt.gone"))
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vgrt doctor: internal error: ModuleNotFoundError: No module named 'vgrt.gone'")
    assert "pip install" not in err


@pytest.mark.parametrize("package, extra", [("onnxscript", "cpu"), ("polygraphy", "trt"), ("triton", "gpu")])
def test_a_missing_lazy_import_names_its_extra(monkeypatch, capsys, package, extra):
    _failing_doctor(monkeypatch, ModuleNotFoundError(f"No module named {package!r}", name=f"{package}.sub"))
    assert main(["doctor"]) == 2
    assert capsys.readouterr().err == (
        f"vgrt doctor: error: the package {package!r} is not installed but is needed here; "
        f"install it with: pip install 'vgrt[{extra}]'\n"
    )


def test_require_names_the_missing_package_even_when_it_is_a_dependency(tmp_path, monkeypatch):
    (tmp_path / "vgrt_test_wrapper.py").write_text("import polygraphy_absent_part\n")
    (tmp_path / "vgrt_test_broken.py").write_text("raise ImportError('undefined symbol: cuInit')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"^the package 'tensorrt' is not installed .*'vgrt\[trt\]'$"):
        require("tensorrt.plugin")
    with pytest.raises(MissingDependencyError, match=r"^the package 'polygraphy_absent_part' is not installed"):
        require("vgrt_test_wrapper")
    with pytest.raises(MissingDependencyError) as broken:
        require("vgrt_test_broken")
    assert str(broken.value) == (
        "'vgrt_test_broken' is installed but does not import (undefined symbol: cuInit); "
        "reinstall it with: pip install --force-reinstall 'vgrt[cpu]'"
    )


@pytest.mark.parametrize("package", ["onnxscript", "onnxruntime"])
def test_export_checks_the_packages_it_needs_before_building(tmp_path, monkeypatch, package):
    from vgrt.export import exporter

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the missing package was found")

    monkeypatch.setattr(exporter, "build_component", no_build)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingDependencyError, match=rf"'{package}' is not installed.*pip install 'vgrt\[cpu\]'"):
        exporter.export(tmp_path / "out", exporter.ExportSettings(preset="tiny"))
    assert not (tmp_path / "out").exists()
