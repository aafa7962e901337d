"""A virtual environment for optimum-intel, the CPU peer of `vgrt bench peer`, prepared on first use.

optimum-intel pins transformers and diffusers below the versions vgrt runs on, so it cannot share vgrt's
environment. Its requirement on torchvision (unversioned) would pull a CUDA torch, so the recipe installs
the CPU torch vgrt runs on first, then optimum-intel with a torchvision of that torch's release, then
removes torchvision again (that build does not import beside the CPU torch, and diffusers imports it if
present). The environment is complete only once its record is written, last.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from vgrt.errors import VgrtError
from vgrt.export.cache import cache_root

log = logging.getLogger(__name__)

TORCH = "torch==2.13.0"  # vgrt's CPU build; a looser pin pulls CUDA packages
TORCHVISION = "torchvision==0.28.0"  # the release beside torch 2.13, only to satisfy optimum-intel's requirement
PACKAGES = ("optimum-intel[openvino]", "diffusers")
RECORD = "vgrt-peer.json"


class PeerEnvironmentError(VgrtError):
    """The peer's environment could not be prepared (pip failed: its output says why)."""


def peer_python(root: Path | None = None) -> Path:
    """The Python of the optimum-intel environment, made on first use (minutes: pip installs from the index)."""
    folder = (root or cache_root()) / "peers" / "optimum-intel"
    python = folder / "bin" / "python"
    if (folder / RECORD).is_file():
        return python
    if folder.exists():  # an earlier preparation stopped part-way: vgrt made this folder, start again
        shutil.rmtree(folder)
    log.info("preparing optimum-intel's environment in %s (one time, a few minutes)", folder)
    _run([sys.executable, "-m", "venv", str(folder)])
    _run([str(python), "-m", "pip", "install", "--quiet", TORCH])
    _run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES, TORCHVISION])
    _run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", "torchvision"])
    versions = _versions(python)
    (folder / RECORD).write_text(json.dumps(versions, indent=1))
    return python


def peer_versions(python: Path) -> dict[str, str]:
    return json.loads((python.parent.parent / RECORD).read_text())


def _versions(python: Path) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in ('optimum-intel', 'optimum', 'openvino', 'diffusers', "
        "'transformers', 'torch')}))"
    )
    return json.loads(_run([str(python), "-c", script]))


def _run(command: list[str]) -> str:
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerEnvironmentError(
            f"preparing optimum-intel's environment failed: {' '.join(command)} exited {done.returncode}:\n"
            f"{done.stderr[-2000:]}"
        )
    return done.stdout
