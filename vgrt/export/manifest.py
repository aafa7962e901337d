"""manifest.json of an exported directory: what it holds, read strictly, and its files checked when opened.

A directory is complete exactly when its manifest exists: the exporter writes everything into a
staging sibling, writes the manifest last, then renames the sibling into place (`vgrt.export.staging`).
A manifest is read against its schema, so a damaged one is refused with the file and the field named,
and every file a runner reads is recorded with its size and sha256 and checked on open (`Manifest.path`).
"""

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from vgrt.errors import ArtifactError, InvalidInputError
from vgrt.export.spec import ComponentSpec
from vgrt.export.verify import RECORD, verify_files

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: each component lists every file it reads, with size and sha256
DTYPES = ("fp32", "fp16")
QUANTISED = ("int8", "fp8")  # calibrated exports (vgrt.calibration): inputs and outputs stay settings.dtype
PRECISIONS = (*DTYPES, *QUANTISED)  # what the weights and products are


@dataclass(frozen=True)
class _MapOf:
    """A JSON object with any keys, each value of `value`'s schema."""

    value: Any


@dataclass(frozen=True)
class _Maybe:
    """An object key that may be absent."""

    schema: Any


# Schemas: a type or union of types; {key: schema} an object with these keys (more are allowed); [schema]
# an array of any length; (schema, ...) an array of exactly these; _MapOf(schema).
_TENSOR = {
    "name": str, "dtype": str, "shape": [int | str], "doc": _Maybe(str), "value_range": _Maybe((float, float)),
    "index_of": _Maybe(str | None),
}  # fmt: skip
_SPEC = {
    "name": str,
    "inputs": [_TENSOR],
    "outputs": [_TENSOR],
    "dims": _MapOf((int, int, int)),
    "multiple_of": _Maybe(_MapOf(int)),
}
_COMPONENT = {
    "file": str, "spec": _SPEC, "features": [str], "fp32_ops": [str], "attention_form": str, "masked_attention_nodes": int,
    "model_sha256": str, "onnx_sha256": str, "files": _MapOf({"bytes": int, "sha256": str}),
}  # fmt: skip
# A quantised export (vgrt.calibration): the backends that open it, the calibration set, what stayed in float.
_QUANTIZATION = {
    "backends": [str], "float_layers": [str], "kept_in_float": [str], "sqnr_threshold_db": float | None,
    "calibration": {"directory": str, "samples": int},
}  # fmt: skip
_SCHEMA = {
    "format_version": int, "preset": str, "source": {"seed": int, "weights": str | None, "allow_pickle": bool, "adapters": _Maybe([str])},
    "settings": {"opset": int, "dtype": str, "attention_form": str}, "components": _MapOf(_COMPONENT),
    "versions": _Maybe(_MapOf(str)), "precision": _Maybe(str), "quantization": _Maybe(_QUANTIZATION),
}  # fmt: skip


@dataclass(frozen=True)
class ComponentEntry:
    name: str
    file: str  # relative to the directory
    spec: ComponentSpec
    features: tuple[str, ...]
    fp32_ops: tuple[str, ...]
    attention_form: str
    files: dict[str, dict[str, Any]]  # every file the component reads: {name: {"bytes", "sha256"}}


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]
    components: dict[str, ComponentEntry]

    @property
    def precision(self) -> str:
        """'fp32', 'fp16', or 'int8' or 'fp8' (a quantised export; its inputs and outputs stay settings.dtype)."""
        return self.data.get("precision", self.data["settings"]["dtype"])

    def check_backend(self, backend: str) -> None:
        """Refuse a backend a quantised export was not made for (the torch backend would rebuild the float
        model from the preset and run that instead)."""
        quantization = self.data.get("quantization")
        if quantization is not None and backend not in quantization["backends"]:
            raise InvalidInputError(
                f"{str(self.directory)!r} is an {self.precision} export that {', '.join(quantization['backends'])} "
                f"open{'s' if len(quantization['backends']) == 1 else ''}, not {backend}; choose one of those backends"
            )

    def component(self, name: str) -> ComponentEntry:
        if name not in self.components:
            raise ArtifactError(
                f"{str(self.directory)!r} has no component {name!r}; it has: {', '.join(self.components)}"
            )
        return self.components[name]

    def path(self, entry: ComponentEntry) -> Path:
        """The path of `entry`'s ONNX file, after checking that every file it reads is the exported one
        (sizes always; contents hashed only when not verified before, see vgrt.export.verify)."""
        verify_files(self.directory, entry.files)
        return self.directory / entry.file


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an exported directory; ArtifactError naming the file when it is missing or malformed."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{str(directory)!r} is not a complete vgrt export (no {MANIFEST}); run `vgrt export --out {directory}`"
        )
    data = _load_json(path)
    if not isinstance(data, dict):
        _refuse(path, "", data, "an object")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{str(path)!r} has format_version {data.get('format_version')!r}, this vgrt reads {FORMAT_VERSION}; "
            "export the directory again"
        )
    _check(data, _SCHEMA, "", path)
    _check_values(data, path)
    return Manifest(directory, data, {name: _entry(name, c, path) for name, c in data["components"].items()})


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **data}, indent=2) + "\n")


def files_of_export(directory: Path) -> set[str] | None:
    """Names of the files vgrt wrote in `directory` by its manifest, read leniently (any format version,
    damaged files allowed); None when the directory has no readable vgrt manifest."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
        names = {MANIFEST, RECORD}
        for component in data["components"].values():
            names |= {component["file"], component["file"] + ".data", *component.get("files", {})}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return names if isinstance(data.get("format_version"), int) else None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(
            f"{str(path)!r} is not text (byte {err.start} is not UTF-8); export the directory again"
        ) from err
    except json.JSONDecodeError as err:
        raise ArtifactError(
            f"{str(path)!r} is not valid JSON ({err}); it may be truncated: export the directory again"
        ) from err
    except RecursionError as err:
        raise ArtifactError(
            f"{str(path)!r} nests too deeply to be a vgrt manifest; export the directory again"
        ) from err
    except OSError as err:
        raise ArtifactError(f"{str(path)!r} cannot be read ({err.strerror}); check its permissions") from err


def _check(value: Any, schema: Any, where: str, path: Path) -> None:
    """Raise ArtifactError naming the first place where `value` does not fit `schema`."""
    if isinstance(schema, _MapOf | dict):
        if not isinstance(value, dict):
            _refuse(path, where, value, "an object")
        if isinstance(schema, _MapOf):
            for key, item in value.items():
                _check(item, schema.value, f"{where}.{key}", path)
            return
        for key, item_schema in schema.items():
            optional = isinstance(item_schema, _Maybe)
            if key not in value:
                if not optional:
                    _refuse(path, f"{where}.{key}", _MISSING, _expected(item_schema))
                continue
            _check(value[key], item_schema.schema if optional else item_schema, f"{where}.{key}", path)
    elif isinstance(schema, list | tuple):
        if not isinstance(value, list) or (isinstance(schema, tuple) and len(value) != len(schema)):
            _refuse(path, where, value, _expected(schema))
        for i, item in enumerate(value):
            _check(item, schema[0] if isinstance(schema, list) else schema[i], f"{where}[{i}]", path)
    elif not _is_instance(value, schema):
        _refuse(path, where, value, _expected(schema))


def _is_instance(value: Any, schema: type | types.UnionType) -> bool:
    allowed = schema.__args__ if isinstance(schema, types.UnionType) else (schema,)
    if isinstance(value, bool):  # JSON true/false are Python ints too
        return bool in allowed
    return isinstance(value, tuple(int | float if t is float else t for t in allowed))


def _check_values(data: dict[str, Any], path: Path) -> None:
    if data["settings"]["dtype"] not in DTYPES:
        _refuse(path, ".settings.dtype", data["settings"]["dtype"], " or ".join(map(repr, DTYPES)))
    if data.get("precision", data["settings"]["dtype"]) not in PRECISIONS:
        _refuse(path, ".precision", data["precision"], " or ".join(map(repr, PRECISIONS)))
    if ("quantization" in data) != (data.get("precision") in QUANTISED):
        expected = "present exactly when precision is 'int8' or 'fp8'"
        _refuse(path, ".quantization", data.get("quantization", _MISSING), expected)
    for name, component in data["components"].items():
        for file in (component["file"], *component["files"]):
            if file in ("", ".", "..") or "/" in file or "\\" in file:
                _refuse(path, f".components.{name}", file, "plain file names inside the export")
        if component["file"] not in component["files"]:
            _refuse(
                path, f".components.{name}.files", list(component["files"]), f"a list that names {component['file']!r}"
            )


def _entry(name: str, c: dict[str, Any], path: Path) -> ComponentEntry:
    try:
        spec = ComponentSpec.from_json(c["spec"])
    except InvalidInputError as err:
        raise ArtifactError(
            f"{str(path)!r} has a malformed spec for {name!r} ({err}); export the directory again"
        ) from err
    return ComponentEntry(
        name, c["file"], spec, tuple(c["features"]), tuple(c["fp32_ops"]), c["attention_form"], c["files"]
    )


_MISSING = object()


def _refuse(path: Path, where: str, value: Any, expected: str) -> NoReturn:
    seen = "missing" if value is _MISSING else f"{_json_type(value)} {_short(value)}"
    raise ArtifactError(
        f"{str(path)!r} is not a valid vgrt manifest: {where.lstrip('.') or 'the top level'} is {seen}, expected "
        f"{expected}; export the directory again"
    )


def _expected(schema: Any) -> str:
    if isinstance(schema, _Maybe):
        return _expected(schema.schema)
    if isinstance(schema, _MapOf | dict):
        return "an object"
    if isinstance(schema, tuple):
        return f"an array of {len(schema)}"
    if isinstance(schema, list):
        return "an array"
    allowed = schema.__args__ if isinstance(schema, types.UnionType) else (schema,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(names[t] for t in allowed)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
