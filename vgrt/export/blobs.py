"""One copy on disk of the weights that cache entries share (the UNet's feature sets hold the same tensors).

A large export keeps each weight tensor in a file named by its sha256, `<sha256>.bin` beside the ONNX
(vgrt.export.exporter). After the cache writes an entry, `share_weights` hard-links each such file with
the store `<cache root>/blobs`: the entry's file joins the store when the store lacks it, and is replaced
by a link to the stored copy when the store has it (that copy's hash checked first), so every entry
holding a tensor links one file. A stored file that no entry links any more has one link left, and
`prune_orphans` removes it. Hard links need one file system: where linking fails, the entry keeps its
own copy. Not symbolic links: ONNX Runtime and OpenVINO refuse weights outside the model's folder.
"""

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vgrt.export.staging import describe_os_error
from vgrt.export.verify import CONTENT_NAME, file_sha256, remember, stamp_known

log = logging.getLogger(__name__)

STORE = "blobs"


def blob_name(sha256: str) -> str:
    return f"{sha256}.bin"


def share_weights(entry: Path, store: Path) -> int:
    """Link the content-named weight files of the export `entry` with `store`; return how many it shares.
    Call it holding the entry's lock. Where links cannot be made, the entry keeps its copies (logged once)."""
    names = sorted(name for name in os.listdir(entry) if CONTENT_NAME.fullmatch(name))
    if not names:
        return 0  # a small export keeps its weights in its graph file
    shared = 0
    try:
        store.mkdir(exist_ok=True)
        for name in names:
            _share(entry / name, store / name)
            shared += 1
    except OSError as err:
        log.warning(
            "cannot hard-link the weights of %s with %s (%s; another file system?): the entry keeps its own copy",
            entry,
            store,
            describe_os_error(err),
        )
    _remember_linked(entry, names[:shared])
    return shared


def _share(file: Path, stored: Path) -> None:
    try:
        os.link(file, stored)  # the store lacks it: the entry's copy joins the store
        return
    except FileExistsError:
        pass
    if os.path.samestat(file.stat(), stored.stat()):
        return
    if file_sha256(stored) != CONTENT_NAME.fullmatch(stored.name)["sha256"]:
        log.warning("%s is damaged; replacing it with the copy of %s", stored, file.parent)
        _replace_with_link(file, stored, stored.parent)
    else:
        _replace_with_link(stored, file, stored.parent)


def _replace_with_link(source: Path, target: Path, scratch: Path) -> None:
    """Atomically make `target` a hard link to `source`; the temporary link lives in `scratch` (the store),
    so an interrupted replacement leaves no stray file in an entry."""
    temporary = scratch / f".{target.name}.{secrets.token_hex(4)}"
    os.link(source, temporary)
    try:
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _remember_linked(entry: Path, names: list[str]) -> None:
    """Record the linked files as verified (an entry's file replaced by the store's copy has that copy's
    modification time, which would make the first open hash it again): their contents were hashed when
    written, or before they were linked. The record then holds only these; the entry's other (small)
    files are hashed once on first open."""
    stamps = {name: stamp_known(entry / name, CONTENT_NAME.fullmatch(name)["sha256"]) for name in names}
    if stamps:
        remember(entry, stamps)


def prune_orphans(store: Path) -> int:
    """Remove the stored weight files that no entry links any more; return the bytes freed."""
    if not store.is_dir():
        return 0
    freed = 0
    for path in store.iterdir():
        if not CONTENT_NAME.fullmatch(path.name):
            continue
        stat = path.stat()
        if stat.st_nlink == 1:
            path.unlink(missing_ok=True)
            freed += stat.st_size
    return freed


@contextmanager
def private_copy(onnx_file: Path) -> Iterator[Path]:
    """`onnx_file` itself when its weights are inside it, else a private copy of it and its weight files.

    Tools that read a large export through the onnx package need the copy: onnx refuses external data with
    more than one hard link (a guard against reading files through planted links), and the cache links
    shared weights; tools may also write probe graphs beside the copy. It is made beside the export's folder
    (same file system, which has room for it) and removed after."""
    weights = [onnx_file.parent / name for name in external_files(onnx_file)]
    if not weights:
        yield onnx_file
        return
    with tempfile.TemporaryDirectory(prefix=".vgrt-private-", dir=onnx_file.parent.parent) as scratch:
        for path in [onnx_file, *weights]:
            shutil.copyfile(path, Path(scratch) / path.name)
        yield Path(scratch) / onnx_file.name


def external_files(onnx_file: Path) -> list[str]:
    """Names of the files holding the external data of `onnx_file`'s initializers, relative to its folder."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    external = (t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return sorted({entry.value for tensor in external for entry in tensor.external_data if entry.key == "location"})
