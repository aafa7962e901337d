"""What the export cache holds, and freeing it (`vgrt cache ls|du|prune`).

An entry is a folder `<preset>-<key>` with a vgrt manifest (vgrt.export.cache); its last use is its
modification time, which every reuse renews. Its size counts the files beside the export that vgrt
wrote there too (TensorRT engines, OpenVINO's compiled models), each file once however many hard links
it has: weight files that entries share (vgrt.export.blobs) count in the most recently used entry only,
so the sizes of the entries add up to what the cache holds. Pruning removes an entry only when it holds
nothing but what vgrt wrote (vgrt.export.staging.check_replaceable) and no process is exporting it now;
it is moved aside first, so an interrupted prune leaves no half-deleted entry; then the shared weight
files that no entry links any more are removed.
"""

import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vgrt.errors import InvalidInputError
from vgrt.export.blobs import STORE, prune_orphans
from vgrt.export.manifest import MANIFEST
from vgrt.export.staging import check_replaceable, discard_directory, target_lock

ENTRY_NAME = re.compile(r"(?P<preset>.+)-(?P<key>[0-9a-f]{16})")


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
    return CacheEntry(
        path,
        match["key"],
        match["preset"],
        tuple(components),
        features,
        dtype,
        folder_bytes(path, seen),
        path.stat().st_mtime,
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
