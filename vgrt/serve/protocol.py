"""The HTTP side of `vgrt serve`, without Ray: request bodies to a method's inputs, errors to statuses.

A compose request is `POST /compose/<method>` with the inputs `vgrt compose <method>` takes, named as in
the registry (`subject_mask`, `steps`, ...), in one of two encodings:

- `multipart/form-data`: one part per input; image and mask inputs as file parts (PNG or JPEG bytes), a
  repeated input (`reference`, `box`, `object`) as one part per item;
- `application/json`: an object; image and mask inputs as base64 text (a `data:image/png;base64,` prefix
  is allowed), repeated inputs as lists, numbers as numbers or text.

Image and mask inputs are always bytes sent by the client, written to the request's own temporary folder
and read from there: a server path is never accepted as an input. Messages that name those files name
them as the input (`'subject'`, `'reference[1]'`), never by their path on the server.
"""

import base64
import binascii
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

# The registry's inputs that are image or mask files; every other input is text or a number.
FILE_INPUTS = frozenset(
    {"subject", "subject_mask", "condition", "region_mask", "foreground", "foreground_mask", "background",
     "placement_mask", "reference", "object"}
)  # fmt: skip

# Registry inputs that are folders on the machine (mca-ctrl's models for its text masks): CLI only.
SERVER_PATH_INPUTS = frozenset({"grounding", "sam"})

MAX_BODY_BYTES = 32 * 1024 * 1024  # default request size limit: a few full-size PNGs


class HttpError(Exception):
    """A request refused (4xx) or failed (5xx), with the message the client sees."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Reply:
    """An HTTP response: status, headers and body."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> "Reply":
        return cls(status, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})})

    @classmethod
    def error(cls, error: HttpError, request_id: str) -> "Reply":
        return cls.json(error.status, {"error": error.message, "status": error.status, "request_id": request_id})


def check_content_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse a body whose declared size is over `limit` before reading it."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HttpError(413, f"the request body is {declared} bytes; this server takes at most {limit} bytes")


async def read_body(chunks: AsyncIterator[bytes], headers: Mapping[str, str], limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit`, declared or not."""
    check_content_length(headers, limit)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"the request body is over {limit} bytes, the most this server takes")
    return bytes(body)


def parse_inputs(content_type: str, body: bytes, folder: Path, repeated: frozenset[str]) -> dict[str, Any]:
    """The inputs of a compose request, image and mask inputs written into `folder` as files.

    Returns option name -> value as `Method.request` takes it: text or numbers, a file path for an image
    or mask input, a list for the `repeated` inputs (a JSON list, or one form part per item)."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        given = _form_fields(content_type, body, repeated)
    elif media_type == "application/json":
        given = _json_fields(body)
    else:
        raise HttpError(
            415, f"content type {media_type or 'none'!r} is not accepted; send multipart/form-data or application/json"
        )
    server_paths = sorted(SERVER_PATH_INPUTS & set(given))
    if server_paths:
        raise HttpError(
            400, f"inputs {', '.join(server_paths)} name folders on the server, which a request cannot choose; the "
            "server takes Grounding DINO and SAM from grounding_dino/ and sam/ in its --weights folder",
        )  # fmt: skip
    return {name: _stored(name, value, folder) for name, value in given.items()}


def _form_fields(content_type: str, body: bytes, repeated: frozenset[str]) -> dict[str, Any]:
    """Part name -> value; a list of values for the `repeated` inputs."""
    header = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        raise HttpError(400, "the multipart body could not be read; check its boundary and part headers")
    values: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise HttpError(400, "a multipart part has no name; give each part Content-Disposition: form-data; name=")
        values.setdefault(name, []).append(_part_value(part, name))
    once = [
        f"{name!r} ({len(items)} parts)" for name, items in values.items() if name not in repeated and len(items) > 1
    ]
    if once:
        raise HttpError(400, f"inputs given more than once that take one value: {', '.join(once)}")
    return {name: items if name in repeated else items[0] for name, items in values.items()}


def _part_value(part: EmailMessage, name: str) -> Any:
    payload = part.get_payload(decode=True) or b""
    if name in FILE_INPUTS:
        return payload
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, f"input {name!r} is not UTF-8 text") from None


def _json_fields(body: bytes) -> dict[str, Any]:
    try:
        given = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HttpError(400, f"the JSON body could not be read: {err}") from None
    if not isinstance(given, dict):
        raise HttpError(400, f"the JSON body must be an object of inputs, got {type(given).__name__}")
    return {name: _decoded(name, value) if name in FILE_INPUTS else value for name, value in given.items()}


def _decoded(name: str, value: Any) -> bytes | list[bytes]:
    if isinstance(value, list):
        return [_decoded(f"{name}[{index}]", item) for index, item in enumerate(value)]  # type: ignore[misc]
    if not isinstance(value, str):
        raise HttpError(400, f"input {name!r} must be base64 text of a PNG or JPEG file, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"input {name!r} is not valid base64 (of a PNG or JPEG file)") from None


def _stored(name: str, value: Any, folder: Path) -> Any:
    """File inputs written into `folder` (named after the input, so messages name the input); others as given."""
    if name not in FILE_INPUTS:
        return value
    if isinstance(value, list):
        return [_write(folder / f"{name}[{index}]", item) for index, item in enumerate(value)]
    return _write(folder / name, value)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def client_message(err: Exception, folder: Path) -> str:
    """The message of a refused request as the client sees it: the request folder's path taken out."""
    return str(err).replace(f"{folder}/", "")
