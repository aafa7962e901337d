"""Package-level promises: a light import, and a CLI that reports errors instead of tracebacks."""

import subprocess
import sys

from vgrt.cli import main


def test_import_vgrt_loads_no_heavy_module():
    code = (
        "import sys, vgrt, vgrt.engines, vgrt.export, vgrt.plugins.masked_attention.identity, vgrt.cli; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'triton', 'diffusers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_cli_error_names_the_problem_and_exits_2(tmp_path, capsys):
    assert main(["export", "--preset", "sd9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'sd9'; choose one of: tiny, sd15, sd21, sdxl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compare_passes_on_a_tiny_export(tiny_export, capsys):
    assert main(["compare", str(tiny_export(features="none"))]) == 0
    assert "PASS" in capsys.readouterr().out
