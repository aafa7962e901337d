"""manifest.json of an exported directory, and the atomic write that makes a directory trustworthy.

A directory is complete exactly when its manifest exists: the exporter writes everything into a
temporary sibling, writes the manifest last, then renames the sibling into place. An interrupted
export leaves only a `.tmp-*` sibling that nothing reads.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgrt.errors import ArtifactError
from vgrt.export.spec import ComponentSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ComponentEntry:
    name: str
    file: str  # relative to the directory
    spec: ComponentSpec
    features: tuple[str, ...]
    fp32_ops: tuple[str, ...]
    attention_form: str


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def components(self) -> dict[str, ComponentEntry]:
        return {
            name: ComponentEntry(
                name, c["file"], ComponentSpec.from_json(c["spec"]), tuple(c["features"]), tuple(c["fp32_ops"]), c["attention_form"]
            )
            for name, c in self.data["components"].items()
        }

    def component(self, name: str) -> ComponentEntry:
        components = self.components
        if name not in components:
            raise ArtifactError(f"{str(self.directory)!r} has no component {name!r}; it has: {', '.join(components)}")
        return components[name]

    def path(self, entry: ComponentEntry) -> Path:
        return self.directory / entry.file


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{str(directory)!r} is not a complete vgrt export (no {MANIFEST}); run `vgrt export --out {directory}`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{str(path)!r} is not valid JSON ({err}); export the directory again") from err
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{str(path)!r} has format version {data.get('format_version')}, this vgrt reads {FORMAT_VERSION}; export again"
        )
    return Manifest(directory, data)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **data}, indent=2) + "\n")
