"""Exports made on first use and reused after, in a cache keyed by everything that shapes them.

The key covers the export settings (preset, components, features, dtype, opset, attention form, seed),
the weights (path, size and modification time of every file under it: a changed file gives a new
key without hashing gigabytes on every start), the same of the adapter checkpoints and the image encoder
folders published beside them, the versions of vgrt, torch and onnx, the versions of graph passes
that may change within a vgrt release (vgrt.export.group_norm), and the UNet's input contract (its spec:
names, shapes, profiles), which may change within a release too. A composer exports each component into
its own entry (vgrt.engines.engine_set), so a method exports only what it runs. Each
entry has a lock (vgrt.export.staging): a process that needs an entry another one is exporting waits for
it and reuses it. An entry is checked before reuse (manifest and file hashes, see vgrt.export.verify); a
damaged one is reported in one line and exported again, and what a killed export left is removed. Each
reuse renews the entry's modification time, which `vgrt cache` reads as its last use
(vgrt.export.cache_entries). Entries share their common weight files, hard-linked from one store in the
cache (vgrt.export.blobs).
"""

import dataclasses
import hashlib
import json
import logging
import os
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path

from vgrt._lazy import is_available
from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export import group_norm
from vgrt.export.blobs import STORE, share_weights
from vgrt.export.components import parse_components
from vgrt.export.exporter import DTYPES, ExportSettings, write_export
from vgrt.export.manifest import read_manifest
from vgrt.export.spec import unet_spec
from vgrt.export.staging import clean_interrupted, describe_os_error, discard_directory, sweep_interrupted, target_lock
from vgrt.models.adapter_checkpoints import adapter_inputs
from vgrt.models.features import parse_features
from vgrt.models.presets import PRESETS
from vgrt.models.source import ModelSource

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
    import torch

    import vgrt

    fields = dataclasses.asdict(settings)
    if not settings.adapters:
        del fields["adapters"]  # exports without adapters keep the keys they had before adapters existed
    identity = {
        "settings": fields,
        "weights": weights_fingerprint(settings.weights),
        "versions": [vgrt.__version__, torch.__version__, _installed_version("onnx")],
        "passes": {"group_norm": group_norm.PASS_VERSION},  # a changed pass makes new exports under one vgrt version
    }
    contract = _unet_contract(settings)
    if contract is not None:  # entries without a UNet keep the keys they had before the contract was keyed
        identity["unet_contract"] = contract
    if settings.adapters:  # what the adapters read: their files, and the image encoder folders published with them
        identity["adapters"] = [weights_fingerprint(str(path)) for path in adapter_inputs(settings.adapters)]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _unet_contract(settings: ExportSettings) -> dict | None:
    """The exported UNet's input contract (its spec, without the block count: the config fixes it, and the key
    covers the config), so that a changed contract makes new exports under one vgrt version; None without a UNet.
    A named preset's spec stands for its weights' (whose files the key covers), so no weights are read here."""
    if settings.preset in PRESETS:
        preset = PRESETS[settings.preset]
    else:
        preset = ModelSource(settings.preset, settings.seed, settings.weights, settings.allow_pickle).model_preset()
    if "unet" not in parse_components(settings.components, preset):
        return None
    return unet_spec(preset, parse_features(settings.features), DTYPES[settings.dtype][0], num_blocks=0).to_json()


def cached_export(settings: ExportSettings, root: Path | None = None) -> Path:
    """The export directory of `settings`, made now if the cache does not hold it yet (or holds it damaged)."""
    settings.validate()
    root = Path(root or cache_root())
    directory = root / f"{settings.preset}-{cache_key(settings)}"
    with ExitStack() as stack:
        try:
            root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(target_lock(directory))  # waits while another process exports this entry
        except OSError as err:
            return _reuse_read_only(directory, err)
        clean_interrupted(directory)
        return _reuse_or_export(directory, settings)


def _reuse_read_only(directory: Path, err: OSError) -> Path:
    """The entry of a cache that cannot be written (so nobody exports into it): used if it is intact."""
    if _entry_problem(directory) is None:
        log.debug("reusing the export in %s", directory)
        mark_used(directory)
        return directory
    raise InvalidInputError(
        f"the export cache {str(directory.parent)!r} cannot be written ({describe_os_error(err)}) and does not hold "
        f"an intact {directory.name}; point VGRT_CACHE (or --cache) at a folder you can write"
    ) from err


def _reuse_or_export(directory: Path, settings: ExportSettings) -> Path:
    problem = _entry_problem(directory)
    if problem is None:
        log.debug("reusing the export in %s", directory)
        mark_used(directory)
        return directory
    damaged = os.path.lexists(directory)
    if not _can_export():
        what = f"is damaged ({problem})" if damaged else "is not in the cache"
        raise ArtifactError(
            f"the export cache entry {str(directory)!r} {what}, and this installation cannot export (onnx and "
            "onnxscript are missing): install them with pip install 'vgrt[cpu]', or copy the entry from a machine "
            "that made it"
        )
    if damaged:
        log.warning("the export cache entry %s is damaged (%s); exporting it again", directory, problem)
        discard_directory(directory)
    else:
        log.info("exporting %s into the cache (first use; reused after)", settings.components)
        sweep_interrupted(directory.parent)  # other entries' leftovers, once per new entry
    write_export(directory, settings)
    share_weights(directory, directory.parent / STORE)  # under the entry's lock: nobody reads it meanwhile
    return directory


def mark_used(directory: Path) -> None:
    """Renew the entry's modification time, which `vgrt cache` shows as its last use and prunes by; a
    cache that cannot be written keeps the time of its last write."""
    try:
        os.utime(directory)
    except OSError:
        pass


def _entry_problem(directory: Path) -> str | None:
    """Why the entry cannot be used as it is (missing, incomplete, damaged), or None when it can."""
    if not os.path.lexists(directory):
        return "missing"
    try:
        manifest = read_manifest(directory)
        for entry in manifest.components.values():
            manifest.path(entry)  # verifies the entry's files
    except ArtifactError as err:
        return str(err)
    return None


def _can_export() -> bool:
    return is_available("onnx") and is_available("onnxscript")


def _installed_version(package: str) -> str | None:
    """A package's version without importing it (an installation without the exporter has no onnx)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
