"""Property tests: whatever a manifest.json holds (binary, truncated, a JSON list, keys missing, values of
the wrong type), reading it gives a Manifest or an ArtifactError naming the file, never another exception."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgrt.errors import ArtifactError
from vgrt.export.manifest import MANIFEST, read_manifest, write_manifest
from vgrt.export.spec import unet_spec
from vgrt.models.presets import get_preset

OPTIONAL_KEYS = {"doc", "value_range", "index_of", "multiple_of", "versions"}
MAPS = {(key,) for key in ("components", "dims", "multiple_of", "files", "versions")}  # objects of any keys
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_subnormal=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def valid_manifest() -> dict:
    spec = unet_spec(get_preset("tiny"), frozenset({"regions"}), "float32", num_blocks=2)
    unet = {"file": "unet.onnx", "spec": spec.to_json(), "features": ["regions"], "fp32_ops": [],
            "attention_form": "custom", "masked_attention_nodes": 4, "model_sha256": "a" * 64, "onnx_sha256": "b" * 64,
            "files": {"unet.onnx": {"bytes": 100, "sha256": "b" * 64}, "unet.onnx.data": {"bytes": 9, "sha256": "c" * 64}}}  # fmt: skip
    return {"format_version": 2, "preset": "tiny", "source": {"seed": 0, "weights": None, "allow_pickle": False},
            "settings": {"opset": 23, "dtype": "fp32", "attention_form": "custom"}, "components": {"unet": unet},
            "versions": {"vgrt": "0.1.0"}}  # fmt: skip


def places(value, path=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield path, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from places(child, (*path, key))


PLACES = [path for path, _ in places(valid_manifest()) if path]


def replaced(data, path, new):
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return data


DELETE = object()


def wrong_kind(original):
    """Values that no manifest position holding `original` accepts: a container for a scalar, any other
    kind for a container (a str may stand for an int in shapes, an int for a float in ranges)."""
    if isinstance(original, dict):
        return json_values.filter(lambda v: not isinstance(v, dict))
    if isinstance(original, list):
        return json_values.filter(lambda v: not isinstance(v, list))
    return st.lists(json_values, max_size=2) | st.dictionaries(st.text(max_size=4), json_values, max_size=2)


@pytest.fixture
def manifest_path(tmp_path):
    return tmp_path / MANIFEST


def refused(path, content: bytes) -> ArtifactError:
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as caught:
        read_manifest(path.parent)
    assert repr(str(path)) in str(caught.value) and "export the directory again" in str(caught.value)
    return caught.value


def test_the_valid_manifest_reads(tmp_path):
    write_manifest(tmp_path, {k: v for k, v in valid_manifest().items() if k != "format_version"})
    assert read_manifest(tmp_path).component("unet").files["unet.onnx.data"]["bytes"] == 9


@SETTINGS
@given(content=st.binary(max_size=200))
def test_bytes_are_refused(manifest_path, content):
    refused(manifest_path, content)


@SETTINGS
@given(value=json_values)
def test_other_json_values_are_refused(manifest_path, value):
    refused(manifest_path, json.dumps(value).encode())


@SETTINGS
@given(data=st.data())
def test_truncated_manifest_is_refused(manifest_path, data):
    text = json.dumps(valid_manifest(), indent=2).encode()
    refused(manifest_path, text[: data.draw(st.integers(0, len(text) - 2))])


@SETTINGS
@given(
    path=st.sampled_from(
        [p for p in PLACES if isinstance(p[-1], str) and p[-1] not in OPTIONAL_KEYS and p[-2:-1] not in MAPS]
    )
)
def test_missing_key_is_refused_by_name(manifest_path, path):
    error = refused(manifest_path, json.dumps(replaced(valid_manifest(), path, DELETE)).encode())
    assert path[-1] in str(error)


@SETTINGS
@given(data=st.data())
def test_value_of_the_wrong_kind_is_refused(manifest_path, data):
    manifest = valid_manifest()
    path = data.draw(st.sampled_from(PLACES))
    original = dict(places(manifest))[path]
    refused(manifest_path, json.dumps(replaced(manifest, path, data.draw(wrong_kind(original)))).encode())


@SETTINGS
@given(data=st.data())
def test_any_replaced_value_reads_or_is_refused(manifest_path, data):
    manifest = replaced(valid_manifest(), data.draw(st.sampled_from(PLACES)), data.draw(json_values))
    manifest_path.write_text(json.dumps(manifest))
    try:
        entries = read_manifest(manifest_path.parent).components
    except ArtifactError as err:
        assert repr(str(manifest_path)) in str(err)
    else:
        assert all(entry.file in entry.files for entry in entries.values())
