"""Running `vgrt bench` as a user would, and reading back what it wrote."""

import contextlib
import io
import json
from pathlib import Path

from vgrt.cli import main


def run_bench(*args: str, out: Path) -> tuple[dict, str, Path]:
    """Run `vgrt bench ARGS --out OUT`; return the JSON it wrote, its stdout and the PNG path."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", *args, "--out", str(out)]) == 0
    (json_path,) = out.glob("*.json")
    return json.loads(json_path.read_text()), stdout.getvalue(), json_path.with_suffix(".png")


def results_by_backend(run: dict) -> dict[str, list[dict]]:
    by_backend: dict[str, list[dict]] = {}
    for case in run["cases"]:
        for result in case["results"]:
            by_backend.setdefault(result["backend"], []).append(result)
    return by_backend
