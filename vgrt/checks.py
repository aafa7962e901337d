"""Checks of caller-given values that the API and the commands share: seeds, and the places vgrt writes to.

They run before any work, so a mistake costs a message, not minutes of compute and a traceback.
"""

import os
import tempfile
from pathlib import Path

from vgrt.errors import InvalidInputError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64) (negative seeds wrap around)


def check_seed(seed: object, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"{name} must be a whole number in [0, 2**64 - 1], got {seed!r}; choose a smaller seed")


def check_output_file(path: str | Path, option: str, suffixes: tuple[str, ...]) -> Path:
    """Refuse an output file vgrt could not write: wrong suffix, an existing folder, a folder that is a
    file, or no write permission. Missing parent folders are fine (they are made when the file is saved)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{option} {str(path)!r} must end in {' or '.join(suffixes)}")
    if _exists(path, option) and path.is_dir():
        raise InvalidInputError(
            f"{option} {str(path)!r} is an existing folder, not a file; name a file in it, e.g. "
            f"{str(path / ('out' + suffixes[0]))!r}"
        )
    _check_can_create(path.parent, option, path)
    return path


def check_writable_folder(path: str | Path, option: str) -> Path:
    """Refuse a folder vgrt could not write into: an existing file, a path under a file, no write
    permission. A missing folder is fine when its nearest existing parent is writable."""
    path = Path(path)
    if _exists(path, option) and not path.is_dir():
        raise InvalidInputError(f"{option} {str(path)!r} is a file, not a folder; give a folder")
    _check_can_create(path, option, path)
    return path


def _exists(path: Path, option: str) -> bool:
    try:
        return path.exists()
    except OSError as err:  # e.g. a parent folder that may not be listed
        raise InvalidInputError(f"{option} {str(path)!r} cannot be reached: {err.strerror}") from err


def _check_can_create(folder: Path, option: str, target: Path) -> None:
    """Write-probe `folder`, or its nearest existing parent when it does not exist yet."""
    existing = folder
    while not _exists(existing, option):
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInputError(
            f"{option} {str(target)!r} lies under {str(existing)!r}, which is a file, not a folder; "
            "choose a path under a folder"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".vgrt-write-probe-", dir=existing)
    except OSError as err:
        raise InvalidInputError(
            f"{option} {str(target)!r} cannot be written: the folder {str(existing)!r} is not writable "
            f"({err.strerror}); choose a writable location or change the folder's permissions"
        ) from err
    os.close(handle)
    os.unlink(probe)
