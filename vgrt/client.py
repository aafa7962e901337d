"""HTTP client of `vgrt serve` (standard library only).

    client = Client("http://127.0.0.1:8000")
    result = client.compose("locref", {"prompt": "a ball", "reference": ["ball.png"], "box": ["0,0,16,16"],
                                       "size": "32x32", "seed": 3})
    Path("out.png").write_bytes(result.png)

Inputs are named as the registry names them (vgrt.runtime.methods.registry); image and mask inputs are
local file paths or bytes, sent as multipart file parts. A composition is idempotent given its seed, so
the client retries what the service could not answer: 503 (the queue is full; Retry-After is honoured),
502 and 504, a 500 that is not vgrt's own (a replica that died with the request), and a dropped or refused
connection. It never retries a 4xx, vgrt's own 500, or an answer that did not come within the timeout
(the service is still composing it). `Client.retries` counts the retries made.
"""

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from vgrt.errors import InvalidInputError, VgrtError
from vgrt.serve.protocol import FILE_INPUTS

RETRIED_STATUSES = frozenset({502, 503, 504})


class RequestError(VgrtError):
    """The service refused or failed a request (status: its HTTP status; 0 when it was not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Retry:
    """attempts: tries per request, the first included. backoff_s: the wait before the first retry,
    doubled each retry up to max_backoff_s, with up to 25% random jitter."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidInputError(f"attempts must be a whole number >= 1, got {self.attempts!r}")

    def wait(self, retry: int, retry_after: float | None) -> float:
        base = min(self.backoff_s * 2**retry, self.max_backoff_s)
        return max(base * (1 + random.random() / 4), retry_after or 0.0)


@dataclass
class Composed:
    """A composition: the PNG's bytes, the service's stage timings (seconds), the request id, the number
    of retries this request needed, and the replica that answered."""

    png: bytes
    timings: dict[str, float]
    request_id: str
    retries: int = 0
    replica: str = ""


@dataclass
class Client:
    """A client of one `vgrt serve` address; safe to share between threads."""

    url: str = "http://127.0.0.1:8000"
    timeout_s: float = 600.0
    retry: Retry = field(default_factory=Retry)
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.retries = 0
        self._lock = threading.Lock()

    def compose(self, method: str, inputs: Mapping[str, Any], request_id: str | None = None) -> Composed:
        """POST /compose/<method>; inputs as in the module docstring."""
        request_id = request_id or uuid.uuid4().hex
        body, content_type = multipart(inputs)
        headers = {"content-type": content_type, "x-request-id": request_id}
        reply_headers, data, retries = self._send("POST", f"/compose/{method}", body, headers)
        timings = json.loads(reply_headers.get("x-vgrt-timings") or "{}")
        request_id = reply_headers.get("x-request-id", request_id)
        return Composed(data, timings, request_id, retries, reply_headers.get("x-vgrt-replica", ""))

    def methods(self) -> dict[str, Any]:
        """The methods served and their inputs (GET /methods)."""
        return json.loads(self._send("GET", "/methods", None, {})[1])["methods"]

    def _send(self, verb: str, path: str, body: bytes | None, headers: dict[str, str]):
        """(headers, body, retries) of the first answer that is not retried; RequestError otherwise."""
        for attempt in range(self.retry.attempts):
            last = attempt == self.retry.attempts - 1
            try:
                with urlopen(Request(self.url + path, body, headers, method=verb), timeout=self.timeout_s) as reply:
                    return {k.lower(): v for k, v in reply.headers.items()}, reply.read(), attempt
            except HTTPError as err:
                data = err.read()
                if last or not _retried(err.code, data):
                    raise RequestError(_message(err.code, data, path), err.code) from None
                retry_after = _seconds(err.headers.get("retry-after"))
            except TimeoutError:  # the service is still composing: another try would only add to its queue
                raise RequestError(f"{self.url} did not answer {verb} {path} within {self.timeout_s:g} s") from None
            except (URLError, HTTPException, ConnectionError) as err:
                if last:
                    reason = getattr(err, "reason", err)
                    raise RequestError(f"{self.url} did not answer {verb} {path} ({reason}) after {attempt + 1} tries")
                retry_after = None
            with self._lock:
                self.retries += 1
            self.sleep(self.retry.wait(attempt, retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retried(status: int, data: bytes) -> bool:
    """503/502/504, or a 500 that vgrt did not answer itself (its own carry a JSON request_id)."""
    return status in RETRIED_STATUSES or (status == 500 and _error_payload(data) is None)


def _error_payload(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) and "request_id" in payload else None


def _message(status: int, data: bytes, path: str) -> str:
    payload = _error_payload(data)
    text = payload["error"] if payload else data.decode("utf-8", "replace").strip()[:500]
    return f"the service answered {status} to {path}: {text}"


def _seconds(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def multipart(inputs: Mapping[str, Any]) -> tuple[bytes, str]:
    """A multipart/form-data body of `inputs` and its content type: file inputs (paths or bytes) as file
    parts, lists as one part per item, None values left out."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in inputs.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None:
                parts.append(_part(boundary, name, item))
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _part(boundary: str, name: str, value: Any) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if name in FILE_INPUTS:
        data = value if isinstance(value, bytes) else _file_bytes(name, value)
        head = f'--{boundary}\r\n{disposition}; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    else:
        data = str(value).encode()
        head = f"--{boundary}\r\n{disposition}\r\n\r\n"
    return head.encode() + data + b"\r\n"


def _file_bytes(name: str, path: str | Path) -> bytes:
    if not Path(path).is_file():
        raise InvalidInputError(f"input {name!r}: the file {str(path)!r} does not exist")
    return Path(path).read_bytes()
