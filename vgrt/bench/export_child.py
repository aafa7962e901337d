"""Run one `vgrt export` in a fresh process and report its time and peak memory.

A fresh process makes the peak resident memory the export's own (not that of the models a benchmark
already holds) and keeps the memory the tracer leaves behind out of the benchmark process. The child
prints one JSON line; the import of torch and the exporter is not part of the timed export.

    python -m vgrt.bench.export_child OUT_DIR SETTINGS_JSON
"""

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vgrt.errors import VgrtError
from vgrt.export.exporter import ExportSettings


@dataclass(frozen=True)
class ExportSample:
    seconds: float
    peak_rss_bytes: int


def export_in_child(out: str | Path, settings: ExportSettings) -> ExportSample:
    """Export `settings` into `out` in a child process; raise VgrtError with its stderr if it fails."""
    report = run_child(__name__, [str(out), json.dumps(asdict(settings))], f"the export of {settings}")
    return ExportSample(report["seconds"], report["peak_rss_bytes"])


def run_child(module: str, args: list[str], what: str) -> dict:
    """Run `python -m module ARGS` and return the JSON of its last stdout line; raise VgrtError with the
    end of its stderr, naming `what` failed, if it exits non-zero."""
    return run_json_command([sys.executable, "-m", module, *args], what)


def run_json_command(command: list[str], what: str) -> dict:
    """Run `command` and return the JSON of its last stdout line (see run_child)."""
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise VgrtError(f"{what} failed in its child process (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(out: str, settings_json: str) -> None:
    import time

    from vgrt.bench.machine import peak_rss_bytes
    from vgrt.export.exporter import export

    settings = ExportSettings(**json.loads(settings_json))
    started = time.perf_counter()
    export(out, settings)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
