"""Exports made on first use and reused after, in a cache keyed by everything that shapes them.

The key covers the export settings (preset, components, features, dtype, opset, attention form, seed),
the weights (path, size and modification time of every file under it: a changed file gives a new
key without hashing gigabytes on every start) and the versions of vgrt, torch and onnx. Entries are
written atomically by the exporter, so an interrupted export is never found here.
"""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from vgrt.export.exporter import ExportSettings, export
from vgrt.export.manifest import MANIFEST

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$VGRT_CACHE, else $XDG_CACHE_HOME/vgrt, else ~/.cache/vgrt."""
    explicit = os.environ.get("VGRT_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vgrt"


def weights_fingerprint(weights: str | None) -> list[list[object]]:
    if not weights:
        return []
    path = Path(weights)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(settings: ExportSettings) -> str:
    import onnx
    import torch

    import vgrt

    identity = {
        "settings": dataclasses.asdict(settings),
        "weights": weights_fingerprint(settings.weights),
        "versions": [vgrt.__version__, torch.__version__, onnx.__version__],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_export(settings: ExportSettings, root: Path | None = None) -> Path:
    """The export directory of `settings`, made now if the cache does not hold it yet."""
    settings.validate()
    directory = Path(root or cache_root()) / f"{settings.preset}-{cache_key(settings)}"
    if (directory / MANIFEST).is_file():
        log.info("reusing the export in %s", directory)
        return directory
    log.info("exporting %s into the cache (first use; reused after)", settings.components)
    return export(directory, settings)
