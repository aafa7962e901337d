"""What the export cache holds, and freeing it (`vgrt cache ls|du|prune`).

An entry is a folder `<preset>-<key>` with a vgrt manifest (vgrt.export.cache); its last use is its
modification time, which every reuse renews. Its size counts the files beside the export that vgrt
wrote there too (TensorRT engines, OpenVINO's compiled models), each file once however many hard links
it has: weight files that entries share (vgrt.export.blobs) count in the most recently used entry only,
so the sizes of the entries add up to what the cache holds. Pruning removes an entry only when it holds
nothing but what vgrt wrote (vgrt.export.staging.check_replaceable) and no process is exporting it now;
it is moved aside first, so an interrupted prune leaves no half-deleted entry; then the shared weight
files that no entry links any more are removed.

What engines compile inside an entry outgrows the export (SD 1.5: 3.4 GB per compiled OpenVINO UNet, one
per static shape; 70 GB of OpenVINO folders beside 25 GB of exports) and goes stale on its own (another
OpenVINO or TensorRT, other settings or shapes), so it is pruned on its own too, by its own last use:
- an OpenVINO runner's folder `openvino/<component>-<16 hex>/` (the prepared model, links to the export's
  weights, `compiled/*.blob`), whose modification time each activation renews;
- a TensorRT engine `tensorrt/<component>-<16 hex>.plan` and its record `.json`, the engine's
  modification time renewed by each load.
Nothing else in those folders is removed (a prune reports it kept). A folder is moved aside before it is
deleted and a record goes before its engine, so an interrupted prune leaves nothing a runner trusts (the
next prune removes a folder it left aside). The export's weights linked into an OpenVINO folder stay with
the export: what removing a compiled artifact frees is its files that have no link outside it. The
entry's own modification time stays: removing compiled artifacts is no use of the entry. An OpenVINO
runner open while its folder goes keeps running what it compiled, but cannot compile a shape it has not
met: give an AGE longer than runners stay open.
"""

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vgrt.errors import InvalidInputError
from vgrt.export.blobs import STORE, prune_orphans
from vgrt.export.manifest import MANIFEST
from vgrt.export.staging import check_replaceable, describe_os_error, discard_directory, target_lock

ENTRY_NAME = re.compile(r"(?P<preset>.+)-(?P<key>[0-9a-f]{16})")
# The names engines give what they compile in an entry (vgrt.engines.openvino_runner.cache_folder,
# vgrt.engines.tensorrt.cache.EngineCache): a folder in `openvino/`, an engine and its record in `tensorrt/`.
COMPILED_NAME = re.compile(r"(?P<component>[^.].*)-(?P<key>[0-9a-f]{16})")
ENGINE_FILES = (".json", ".plan")  # in the order a prune removes them: the record first
# An OpenVINO folder moved aside to be deleted (vgrt.export.staging.discard_directory) by a prune that was killed.
MOVED_ASIDE = re.compile(rf"\.{COMPILED_NAME.pattern}\.old-[0-9a-f]{{8}}")
NOT_COMPILED = "left alone: not named as vgrt names compiled artifacts (<component>-<16 hex digits>)"


@dataclass(frozen=True)
class CompiledArtifact:
    """What an engine compiled in an entry: an OpenVINO runner's folder, or a TensorRT engine and its record."""

    kind: str  # "openvino" or "tensorrt"
    name: str  # "<component>-<16 hex>"; a moved-aside folder's own name
    paths: tuple[Path, ...]  # the folder, or the record and the engine, in the order they are removed
    bytes: int  # each file once, however many hard links it has
    freed: int  # what removing it frees: its files that have no hard link outside it
    last_use: float | None  # seconds since the epoch; None for a folder an interrupted prune moved aside

    @property
    def path(self) -> Path:
        """The folder or the engine."""
        return self.paths[-1]

    @property
    def entry(self) -> Path:
        return self.path.parent.parent


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    key: str
    preset: str
    components: tuple[str, ...]
    features: tuple[str, ...]  # the UNet's; () when the entry holds no UNet or a plain one
    dtype: str
    bytes: int
    last_use: float  # seconds since the epoch
    compiled: tuple[CompiledArtifact, ...] = ()  # most recently used first
    not_compiled: tuple[Path, ...] = ()  # what else the engines' folders hold: never pruned

    def describe(self) -> str:
        """'unet (mutual, extra)' or 'vae_decoder'."""
        return ", ".join(f"unet ({', '.join(self.features) or 'none'})" if c == "unet" else c for c in self.components)


def list_entries(root: Path) -> list[CacheEntry]:
    """The cache's entries, most recently used first; folders that are not vgrt entries are left out. A file
    that several entries link counts in the first of them only."""
    if not root.is_dir():
        return []
    paths = [path for path in root.iterdir() if ENTRY_NAME.fullmatch(path.name) and path.is_dir()]
    seen: set[tuple[int, int]] = set()
    found = (_read_entry(path, seen) for path in sorted(paths, key=_last_use, reverse=True))
    return [entry for entry in found if entry is not None]


def _last_use(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _read_entry(path: Path, seen: set[tuple[int, int]]) -> CacheEntry | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
        components = data["components"]
        features = tuple(components.get("unet", {}).get("features", ()))
        dtype = data["settings"]["dtype"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no readable manifest: not an entry vgrt finished writing
    match = ENTRY_NAME.fullmatch(path.name)
    compiled, others = compiled_artifacts(path)
    return CacheEntry(
        path,
        match["key"],
        match["preset"],
        tuple(components),
        features,
        dtype,
        folder_bytes(path, seen),
        path.stat().st_mtime,
        compiled,
        others,
    )


def folder_bytes(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of the files under `path`, a file with several hard links counted once; files in `seen`
    (device, inode) are not counted, and the ones counted are added to it."""
    seen, total = set() if seen is None else seen, 0
    for folder, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def compiled_artifacts(entry: Path) -> tuple[tuple[CompiledArtifact, ...], tuple[Path, ...]]:
    """The compiled artifacts in `entry`, most recently used first (folders left aside by an interrupted
    prune last), and what else its `openvino/` and `tensorrt/` folders hold."""
    found, others = [], []
    for child in _children(entry / "openvino", others):
        if _is_folder(child) and COMPILED_NAME.fullmatch(child.name):
            found.append(_artifact("openvino", (child,), _last_use(child)))
        elif _is_folder(child) and MOVED_ASIDE.fullmatch(child.name):
            found.append(_artifact("openvino", (child,), None))
        else:
            others.append(child)
    engines: dict[str, dict[str, Path]] = {}
    for child in _children(entry / "tensorrt", others):
        if child.suffix in ENGINE_FILES and COMPILED_NAME.fullmatch(child.stem) and _is_file(child):
            engines.setdefault(child.stem, {})[child.suffix] = child
        else:
            others.append(child)
    for files in engines.values():
        paths = tuple(files[suffix] for suffix in ENGINE_FILES if suffix in files)
        found.append(_artifact("tensorrt", paths, _last_use(paths[-1])))  # the engine's, else the record's
    found.sort(key=lambda a: (a.last_use is None, -(a.last_use or 0.0)))
    return tuple(found), tuple(sorted(others))


def _children(folder: Path, others: list[Path]) -> list[Path]:
    """What an engines' folder holds; a link in the folder's place is left alone (its target is not the cache's)."""
    if folder.is_symlink():
        others.append(folder)
        return []
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _artifact(kind: str, paths: tuple[Path, ...], last_use: float | None) -> CompiledArtifact:
    name = paths[-1].stem if kind == "tensorrt" else paths[-1].name
    return CompiledArtifact(kind, name, paths, *_sizes(paths), last_use)


def _sizes(paths: tuple[Path, ...]) -> tuple[int, int]:
    """The bytes of the files at `paths` (folders walked), each file once however many hard links it has, and
    the part that removing them frees: the files none of whose links lies elsewhere (not the export's weights)."""
    inodes: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [size, links, links among paths]
    for path in paths:
        walked = os.walk(path) if _is_folder(path) else [(str(path.parent), [], [path.name])]
        for folder, _, files in walked:
            for name in files:
                try:
                    stat = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:  # removed as we walked (an engine replaced, a prune in another process)
                    continue
                inode = inodes.setdefault((stat.st_dev, stat.st_ino), [stat.st_size, stat.st_nlink, 0])
                inode[2] += 1
    total = sum(size for size, _, _ in inodes.values())
    return total, sum(size for size, links, here in inodes.values() if here >= links)


def entries_to_prune(
    entries: list[CacheEntry],
    older_than: float | None = None,
    max_bytes: int | None = None,
    everything: bool = False,
    now: float | None = None,
) -> list[CacheEntry]:
    """The entries unused for `older_than` seconds, and the least recently used ones beyond the first
    `max_bytes` (kept newest first), or all of them; in the order of `entries` (most recent first)."""
    if everything:
        return list(entries)
    now = time.time() if now is None else now
    chosen, kept = [], 0
    for entry in sorted(entries, key=lambda e: e.last_use, reverse=True):
        stale = older_than is not None and now - entry.last_use > older_than
        over = max_bytes is not None and kept + entry.bytes > max_bytes
        if stale or over:
            chosen.append(entry)
        else:
            kept += entry.bytes
    return chosen


def prune(entries: Iterable[CacheEntry]) -> list[tuple[CacheEntry, str | None]]:
    """Remove each entry, then the shared weight files no entry links any more; (entry, None) when removed,
    (entry, why it was kept) when not."""
    done = []
    for entry in entries:
        with target_lock(entry.path, wait=False) as locked:
            if not locked:
                done.append((entry, "another process is exporting it now"))
                continue
            try:
                check_replaceable(entry.path, "the cache entry")
            except InvalidInputError as err:
                done.append((entry, str(err)))
                continue
            discard_directory(entry.path)
            done.append((entry, None))
    for root in {entry.path.parent for entry, reason in done if reason is None}:
        prune_orphans(root / STORE)
    return done


def artifacts_to_prune(
    entries: Iterable[CacheEntry], older_than: float | None = None, everything: bool = False, now: float | None = None
) -> list[CompiledArtifact]:
    """The compiled artifacts in `entries` unused for `older_than` seconds, or all of them; either way the
    folders an interrupted prune left aside. None without a criterion."""
    if older_than is None and not everything:
        return []
    now = time.time() if now is None else now
    return [
        artifact
        for entry in entries
        for artifact in entry.compiled
        if everything or artifact.last_use is None or now - artifact.last_use > older_than
    ]


def prune_compiled(artifacts: Iterable[CompiledArtifact]) -> list[tuple[CompiledArtifact, str | None]]:
    """Remove each compiled artifact, holding its entry's lock; (artifact, None) when removed, (artifact, why
    it was kept) when not. A folder is moved aside first and an engine's record goes before the engine, so
    an interrupted prune leaves nothing a runner trusts. The entries' modification times stay as they were."""
    by_entry: dict[Path, list[CompiledArtifact]] = {}
    for artifact in artifacts:
        by_entry.setdefault(artifact.entry, []).append(artifact)
    done = []
    for entry, group in by_entry.items():
        with target_lock(entry, wait=False) as locked:
            for artifact in group:
                done.append((artifact, _remove(artifact) if locked else "another process is exporting its entry now"))
    return done


def _remove(artifact: CompiledArtifact) -> str | None:
    """Remove one compiled artifact; None when done, else why it is still there."""
    try:
        if artifact.kind == "tensorrt":
            for path in artifact.paths:
                path.unlink(missing_ok=True)
        elif artifact.last_use is None:  # already aside
            shutil.rmtree(artifact.path)
        else:
            discard_directory(artifact.path)
    except OSError as err:
        return f"cannot remove it ({describe_os_error(err)})"
    return None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str, option: str = "--max-size") -> int:
    """'500M', '10G', '1.5g' or a byte count -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.strip().lower())
    if not match:
        raise InvalidInputError(f"{option} {text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 10G)")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def parse_age(text: str, option: str = "--older-than") -> float:
    """'30d', '12h', '90m', '2w' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip().lower())
    if not match:
        raise InvalidInputError(
            f"{option} {text!r} is not an age; give a number with s, m, h, d or w (e.g. 30d for thirty days)"
        )
    return float(match[1]) * _AGE_UNITS[match[2]]


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
