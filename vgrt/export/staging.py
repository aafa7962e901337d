"""How an export directory is written so that no reader trusts a half-written one and no user file is lost.

A writer takes the target's lock (`.NAME.lock` beside it, an fcntl.flock that the kernel releases when
the process dies), writes everything into a staging sibling `.NAME.tmp-XXXXXXXX` with the manifest last,
then swaps it in: the old directory is renamed to `.NAME.old-XXXXXXXX/NAME`, the staging one into place,
the old one removed. Every writer of NAME holds the lock, so while holding it any `.NAME.tmp-*` or
`.NAME.old-*` sibling is what a killed writer left: `clean_interrupted` removes them, and puts back an old
directory that a writer killed mid-swap had moved aside.

Only vgrt's own exports are replaced (`check_replaceable`): never a file, a foreign folder, or files
vgrt did not write inside an export.
"""

import errno
import fcntl
import fnmatch
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vgrt.errors import InvalidInputError
from vgrt.export.manifest import files_of_export

log = logging.getLogger(__name__)

# What vgrt writes inside an export besides the files its manifest names: `vgrt build`'s engine cache
# and rewritten ONNX, the OpenVINO runner's cache, and the verification record's temporary file.
WRITTEN_BESIDE = ("tensorrt", "openvino", "*.trt-*.onnx", ".verified.json.tmp-*")


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def target_lock(target: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of `target` (waiting for another process's export to finish); yields False,
    holding nothing, when `wait` is False and another process holds it. Raises OSError when the lock
    cannot be created (a read-only folder). The lock file is removed on release."""
    path = lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        if _is_current(fd, path):
            break
        os.close(fd)  # a holder removed the file as we waited: lock the one now at `path`
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def claimed_target(target: Path, option: str = "--out") -> Iterator[None]:
    """What every writer of an export does first: take `target`'s lock (waiting for another writer), clean
    up what an interrupted write left, and refuse a target vgrt may not replace, naming `option`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target_lock(target)
        lock.__enter__()
    except OSError as err:
        raise InvalidInputError(
            f"cannot write an export at {str(target)!r} ({describe_os_error(err)}); choose another {option}"
        ) from err
    try:
        clean_interrupted(target)
        check_replaceable(target, option)
        yield
    finally:
        lock.__exit__(None, None, None)


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False


def staging_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[0-9a-f]{{8}}")


def clean_interrupted(target: Path) -> None:
    """Remove the staging and retired siblings of `target` that a killed writer left; if the writer died
    between moving the old directory aside and moving the new one in, put the old one back.
    Call it holding `target_lock(target)`."""
    pattern = staging_pattern(target.name)
    for leftover in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if not match or leftover.is_symlink():
            continue
        retired = leftover / target.name
        if match.group(1) == "old" and retired.is_dir() and not os.path.lexists(target):
            os.replace(retired, target)
            log.warning("restored %s, which an interrupted export had moved aside", target)
        log.info("removing %s, left by an interrupted export", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def sweep_interrupted(folder: Path) -> None:
    """`clean_interrupted` for every target in `folder` whose lock no live process holds."""
    names = {m.group(1) for p in folder.iterdir() if (m := re.fullmatch(r"\.(.+)\.(?:tmp|old)-[0-9a-f]{8}", p.name))}
    for name in sorted(names):
        with target_lock(folder / name, wait=False) as locked:
            if locked:
                clean_interrupted(folder / name)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a new staging sibling of `target`; on success it replaces `target`, on error it is removed.
    Call it holding `target_lock(target)`."""
    staging = _new_sibling(target, "tmp")
    try:
        yield staging
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    retired = _retire(target)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        shutil.rmtree(retired.parent)
        raise
    shutil.rmtree(retired.parent)


def _retire(target: Path) -> Path:
    """Move `target` into a new `.NAME.old-*` sibling; return where it now is."""
    retired = _new_sibling(target, "old") / target.name
    os.replace(target, retired)
    return retired


def _new_sibling(target: Path, kind: str) -> Path:
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def discard_directory(target: Path) -> None:
    """Remove vgrt's own directory `target` (a damaged cache entry): moved aside first, so that a kill
    midway leaves a stale sibling that `clean_interrupted` removes, never a half-deleted entry."""
    shutil.rmtree(_retire(target).parent)


def check_replaceable(target: Path, option: str = "--out") -> None:
    """Raise InvalidInputError unless `target` is absent, an empty folder, or a vgrt export holding only
    what vgrt wrote: an export replaces its target, and must never delete a user's files."""
    if not os.path.lexists(target):
        return
    fix = f"choose another {option}, or remove it yourself"
    if target.is_symlink() or not target.is_dir():
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise InvalidInputError(f"{option} {str(target)!r} is {kind}, not a vgrt export, and would be replaced; {fix}")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    written = files_of_export(target)
    if written is None:
        raise InvalidInputError(
            f"{option} {str(target)!r} is a folder that is not a vgrt export (it has no readable manifest.json) and "
            f"would be replaced with everything in it ({_listing(entries)}); {fix}"
        )
    foreign = [n for n in entries if n not in written and not any(fnmatch.fnmatch(n, p) for p in WRITTEN_BESIDE)]
    if foreign:
        raise InvalidInputError(
            f"{option} {str(target)!r} is a vgrt export that also holds files vgrt did not write ({_listing(foreign)}); "
            f"replacing it would delete them: move them out, or {fix}"
        )


def _listing(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def describe_os_error(err: OSError) -> str:
    """'Permission denied: /path' in one short phrase, for messages that name the fix."""
    reason = err.strerror or errno.errorcode.get(err.errno or 0, str(err))
    return f"{reason}: {err.filename}" if err.filename else reason
