"""The engine cache: serialized engines keyed by everything that makes an engine valid, verified on load.

An engine is valid only for the ONNX it was built from, the TensorRT version that built it, the GPU
model and compute capability it was tuned on, its optimisation profile, the plugin it embeds and the
build settings. The key holds all of them; its digest names the files. Each engine is written next to a
record (the key and the engine's sha256) with temporary files and renames, the record last, so a reader
sees a complete pair or none. A record that does not match its key, or an engine whose checksum does not
match its record, is stale or corrupt: it is deleted and never handed to TensorRT. Each load renews the
engine's modification time, its last use: `vgrt cache prune` removes engines unused for a time
(vgrt.export.cache_entries), the record first, so a pair it was removing when killed is never loaded.
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vgrt.errors import ArtifactError

log = logging.getLogger(__name__)

RECORD_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    component: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]  # (input, min, opt, max)
    plugin_version: str  # "" when the engine embeds no vgrt plugin
    build: tuple[tuple[str, object], ...]  # BuildSettings.engine_fields(), sorted

    def to_json(self) -> dict[str, object]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as they read back from a record

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def gpu_slug(self) -> str:
        name = "".join(c if c.isalnum() else "-" for c in self.gpu_name.lower())
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


class EngineCache:
    """Engines of one cache directory (by default `<export>/tensorrt/`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def engine_path(self, key: EngineKey) -> Path:
        return self.directory / f"{key.component}-{key.digest[:16]}.plan"

    def record_path(self, key: EngineKey) -> Path:
        return self.engine_path(key).with_suffix(".json")

    def timing_cache_path(self, key: EngineKey) -> Path:
        """Tactic timings, shared by builds for one GPU model and TensorRT version (never across GPUs)."""
        return self.directory / f"timing-{key.gpu_slug}-trt{key.tensorrt_version}.cache"

    def contains(self, key: EngineKey) -> bool:
        """Whether a record for `key` exists (cheap; `load` does the verification)."""
        return self.record_path(key).is_file() and self.engine_path(key).is_file()

    def load(self, key: EngineKey) -> bytes | None:
        """The verified engine for `key`, or None when there is none, or it was stale or corrupt (deleted)."""
        record_path, engine_path = self.record_path(key), self.engine_path(key)
        if not record_path.is_file():
            return None
        problem = None
        try:
            record = json.loads(record_path.read_text())
            engine = engine_path.read_bytes()
        except (OSError, ValueError) as err:
            problem = f"unreadable ({err})"
        else:
            if record.get("version") != RECORD_VERSION or record.get("key") != key.to_json():
                problem = "stale (its record was made for another key)"
            elif hashlib.sha256(engine).hexdigest() != record.get("engine_sha256"):
                problem = "corrupt (its checksum does not match its record)"
        if problem is None:
            renew_last_use(engine_path)
            return engine
        log.warning("discarding cached engine %s: %s", engine_path, problem)
        self.discard(key)
        return None

    def store(self, key: EngineKey, engine) -> Path:
        """Write `engine` (bytes or a buffer such as TensorRT's IHostMemory) atomically; return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        engine_path = self.engine_path(key)
        write_atomically(engine_path, engine)
        record = {"version": RECORD_VERSION, "key": key.to_json(), "engine_sha256": hashlib.sha256(engine).hexdigest()}
        write_atomically(self.record_path(key), (json.dumps(record, indent=2) + "\n").encode())
        return engine_path

    def discard(self, key: EngineKey) -> None:
        for path in (self.record_path(key), self.engine_path(key)):
            path.unlink(missing_ok=True)


def write_atomically(path: Path, data) -> None:
    """Write `data` to `path` through a temporary sibling and a rename: readers see all of it or nothing."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def renew_last_use(engine_path: Path) -> None:
    """Set the engine's modification time to now: its last use, by which `vgrt cache prune` frees engines
    unused for a time. Best effort: a read-only cache still serves its engines."""
    with contextlib.suppress(OSError):
        os.utime(engine_path)


def load_verified(cache: EngineCache, key: EngineKey) -> bytes:
    """The engine for `key`, or ArtifactError when it is missing, stale or corrupt."""
    engine = cache.load(key)
    if engine is None:
        raise ArtifactError(
            f"no valid TensorRT engine in {str(cache.directory)!r} for this export, TensorRT {key.tensorrt_version} "
            f"and {key.gpu_name}; build it with `vgrt build <export dir> --backend tensorrt`"
        )
    return engine
