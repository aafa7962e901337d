"""Request bodies to a method's inputs, and the 4xx answers for bodies that cannot be read (no Ray)."""

import asyncio
import base64
import json
from pathlib import Path

import pytest

from vgrt.client import multipart
from vgrt.serve.protocol import HttpError, client_message, parse_inputs, read_body

PNG_LIKE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-a-boundary\r\n"  # CRLFs must survive


def _parse(content_type: str, body: bytes, folder, repeated=frozenset()):
    return parse_inputs(content_type, body, folder, repeated)


def test_multipart_files_are_written_and_text_is_kept(tmp_path):
    body, content_type = multipart({"subject": PNG_LIKE, "prompt": "a réd ball", "steps": 3, "box": ["0,0,8,8"]})
    inputs = _parse(content_type, body, tmp_path, frozenset({"box"}))
    assert inputs["subject"] == str(tmp_path / "subject")
    assert (tmp_path / "subject").read_bytes() == PNG_LIKE
    assert inputs["prompt"] == "a réd ball" and inputs["steps"] == "3" and inputs["box"] == ["0,0,8,8"]


def test_repeated_file_parts_become_a_list_of_files(tmp_path):
    body, content_type = multipart({"reference": [b"one", b"two"], "box": ["0,0,8,8", "8,8,16,16"]})
    inputs = _parse(content_type, body, tmp_path, frozenset({"reference", "box"}))
    assert [Path(path).read_bytes() for path in inputs["reference"]] == [b"one", b"two"]
    assert inputs["reference"][1].endswith("reference[1]") and inputs["box"] == ["0,0,8,8", "8,8,16,16"]


def test_a_single_valued_input_given_twice_is_refused(tmp_path):
    body, content_type = multipart({"prompt": ["a", "b"]})
    with pytest.raises(HttpError, match=r"'prompt' \(2 parts\)") as err:
        _parse(content_type, body, tmp_path)
    assert err.value.status == 400


def test_json_images_are_base64_or_data_urls(tmp_path):
    encoded = base64.b64encode(PNG_LIKE).decode()
    body = json.dumps({"subject": encoded, "object": [f"data:image/png;base64,{encoded}"], "steps": 2}).encode()
    inputs = _parse("application/json", body, tmp_path, frozenset({"object"}))
    assert (tmp_path / "subject").read_bytes() == PNG_LIKE == (tmp_path / "object[0]").read_bytes()
    assert inputs["steps"] == 2


@pytest.mark.parametrize(
    "content_type, body, status, message",
    [
        ("application/json", b"{not json", 400, "the JSON body could not be read"),
        ("application/json", b"[1, 2]", 400, "must be an object of inputs, got list"),
        ("application/json", b'{"subject": "@@@"}', 400, "input 'subject' is not valid base64"),
        ("application/json", b'{"subject": "/etc/passwd"}', 400, "input 'subject' is not valid base64"),
        ("application/json", b'{"subject": 5}', 400, "must be base64 text of a PNG or JPEG file, got int"),
        ("text/plain", b"hello", 415, "content type 'text/plain' is not accepted"),
        ("multipart/form-data; boundary=x", b"garbage", 400, "the multipart body could not be read"),
    ],
)
def test_unreadable_bodies_are_refused_with_their_reason(tmp_path, content_type, body, status, message):
    with pytest.raises(HttpError, match=message) as err:
        _parse(content_type, body, tmp_path)
    assert err.value.status == status
    assert not any(tmp_path.iterdir())  # nothing of a refused body is kept


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def test_bodies_over_the_limit_get_413_declared_or_streamed():
    assert asyncio.run(read_body(_chunks(b"ab", b"cd"), {}, limit=4)) == b"abcd"
    with pytest.raises(HttpError, match="is 10 bytes; this server takes at most 4") as err:
        asyncio.run(read_body(_chunks(b"ab"), {"content-length": "10"}, limit=4))
    assert err.value.status == 413
    with pytest.raises(HttpError, match="over 4 bytes") as err:
        asyncio.run(read_body(_chunks(b"abc", b"de"), {}, limit=4))
    assert err.value.status == 413


def test_client_messages_name_inputs_not_server_paths(tmp_path):
    err = ValueError(f"image '{tmp_path}/subject_mask' is 16x16 but its image is 32x32")
    assert client_message(err, tmp_path) == "image 'subject_mask' is 16x16 but its image is 32x32"


def test_file_inputs_are_text_options_of_the_registry():
    from vgrt.runtime.methods.registry import METHODS
    from vgrt.serve.protocol import FILE_INPUTS

    options = {option.name: option for method in METHODS.values() for option in method.options}
    assert FILE_INPUTS <= set(options), FILE_INPUTS - set(options)  # a renamed input must be renamed here too
    assert all(options[name].type is str and not options[name].choices for name in FILE_INPUTS)
