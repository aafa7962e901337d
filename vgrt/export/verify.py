"""Checks that the files of an export are the ones its manifest records, hashing each file only once.

The manifest records every file a component reads (its ONNX and, for models over 1 GB, the external
weights) with its size and sha256. The first check hashes them; a small record beside the manifest
(`.verified.json`) then remembers each verified file's size, modification and change times, so later
checks only stat the files. A file written since (a changed time or size) is hashed again. The record
is only a memo: unreadable or missing, it is rebuilt; not writable (a read-only export), every check hashes.
"""

import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from vgrt.errors import ArtifactError

log = logging.getLogger(__name__)

RECORD = ".verified.json"
CONTENT_NAME = re.compile(r"(?P<sha256>[0-9a-f]{64})\.bin")  # vgrt.export.blobs names shared weights so


@dataclass(frozen=True)
class FileStamp:
    """What a verified file looked like: its stat fields that change on every write, and its hash."""

    bytes: int
    mtime_ns: int
    ctime_ns: int
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_file(path: Path) -> FileStamp:
    """Stat, then hash: a write during hashing changes the times, so the stamp is never newer than the hash."""
    stat = path.stat()
    return FileStamp(stat.st_size, stat.st_mtime_ns, _change_time(path, stat), file_sha256(path))


def stamp_known(path: Path, sha256: str) -> FileStamp:
    """The stamp of a file whose content was hashed already (when it was written or linked): a stat only."""
    stat = path.stat()
    return FileStamp(stat.st_size, stat.st_mtime_ns, _change_time(path, stat), sha256)


def _change_time(path: Path, stat: os.stat_result) -> int:
    """The change time, except for content-named weights (`<sha256>.bin`): the export cache hard-links those
    among its entries (vgrt.export.blobs), and each new link changes the change time of every entry's copy.
    Their size and modification time still change on any write."""
    return 0 if CONTENT_NAME.fullmatch(path.name) else stat.st_ctime_ns


def verify_files(directory: Path, expected: dict[str, dict[str, object]]) -> None:
    """Raise ArtifactError unless every file of `expected` ({name: {"bytes", "sha256"}}) in `directory`
    has that size and content; sizes are always compared, contents only when not remembered."""
    remembered = _read_record(directory)
    verified = {}
    for name, want in expected.items():
        path = directory / name
        stat = _stat_or_refuse(path)
        if stat.st_size != want["bytes"]:
            raise ArtifactError(
                f"{str(path)!r} changed since it was exported: it has {stat.st_size} bytes, its manifest records "
                f"{want['bytes']} (truncated or replaced); export the directory again"
            )
        stamp = FileStamp(stat.st_size, stat.st_mtime_ns, _change_time(path, stat), str(want["sha256"]))
        if remembered.get(name) != stamp:
            stamp = stamp_file(path)
            if stamp.sha256 != want["sha256"]:
                raise ArtifactError(
                    f"{str(path)!r} changed since it was exported (damaged): its sha256 is {stamp.sha256[:16]}..., "
                    f"its manifest records {str(want['sha256'])[:16]}...; export the directory again"
                )
        verified[name] = stamp
    if any(remembered.get(name) != stamp for name, stamp in verified.items()):
        remember(directory, {**remembered, **verified})


def remember(directory: Path, stamps: dict[str, FileStamp]) -> None:
    """Write the record of verified files atomically; a folder that cannot be written keeps no record."""
    record = {name: asdict(stamp) for name, stamp in stamps.items()}
    temporary = directory / f"{RECORD}.tmp-{secrets.token_hex(4)}"
    try:
        temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, directory / RECORD)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        log.debug("not remembering verified files in %s (%s); the next check hashes them again", directory, err)


def _read_record(directory: Path) -> dict[str, FileStamp]:
    try:
        record = json.loads((directory / RECORD).read_text())
        return {name: FileStamp(**fields) for name, fields in record.items()}
    except (OSError, ValueError, TypeError, AttributeError):  # missing, unreadable or malformed: hash again
        return {}


def _stat_or_refuse(path: Path) -> os.stat_result:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ArtifactError(f"{str(path)!r} is missing from its export; export the directory again") from None
    except OSError as err:
        raise ArtifactError(f"{str(path)!r} cannot be read ({err.strerror}); check its permissions") from err
    if not path.is_file():
        raise ArtifactError(f"{str(path)!r} is not a file; export the directory again")
    return stat
