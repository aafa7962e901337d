"""vgrt.client and `vgrt request` against a scripted stdlib HTTP server on 127.0.0.1 (no Ray): retries on
503 and lost replicas, counted; no retry of refusals; the CLI's output and errors."""

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vgrt.cli import main
from vgrt.client import Client, RequestError, Retry

PNG = b"\x89PNG\r\n\x1a\nfake"


class Scripted(ThreadingHTTPServer):
    """Answers each request with the next (status, body, headers) of `script`, then 200 with PNG."""

    def __init__(self, script: list[tuple[int, bytes, dict[str, str]]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.seen, self.delay_s = list(script), [], 0.0

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up is part of the script
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        status, data, headers = self.server.script.pop(0) if self.server.script else (200, PNG, {})
        time.sleep(self.server.delay_s)
        self.send_response(status)
        headers = {"content-type": "image/png", "x-vgrt-timings": '{"denoise": 0.5}', **headers}
        for name, value in {**headers, "content-length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator:
    made = []

    def start(script):
        made.append(Scripted(script))
        threading.Thread(target=made[-1].serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return made[-1]

    yield start
    for server in made:
        server.shutdown()
        server.server_close()


def _vgrt_error(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    body = json.dumps({"error": message, "status": status, "request_id": "x"}).encode()
    return status, body, {"content-type": "application/json"}


BUSY = (503, b"Request dropped due to backpressure", {"retry-after": "0"})
REPLICA_DIED = (500, b"Internal Server Error", {"content-type": "text/plain"})


def _client(url: str, attempts: int = 4, waits: list | None = None) -> Client:
    return Client(
        url,
        timeout_s=5,
        retry=Retry(attempts=attempts, backoff_s=0.01),
        sleep=(waits if waits is not None else []).append,
    )


def test_503_and_a_lost_replica_are_retried_and_counted(server, tmp_path):
    scripted = server([BUSY, REPLICA_DIED, BUSY])
    waits = []
    client = _client(scripted.url, waits=waits)
    result = client.compose("vcf", {"prompt": "a fox", "reference": PNG, "steps": 2}, request_id="abc")
    assert result.png == PNG and result.timings == {"denoise": 0.5} and result.retries == 3 == client.retries
    assert len(waits) == 3 and waits[1] > waits[0] > 0  # backoff grows
    assert {headers["x-request-id"] for _, headers, _ in scripted.seen} == {"abc"}  # one id across the retries
    assert len(scripted.seen) == 4 and scripted.seen[0][0] == "/compose/vcf"


@pytest.mark.parametrize("answer", [_vgrt_error(400, "--size 30x30 is not usable"), _vgrt_error(500, "failed")])
def test_refusals_and_vgrt_failures_are_not_retried(server, answer):
    scripted = server([answer])
    client = _client(scripted.url)
    with pytest.raises(RequestError, match=f"answered {answer[0]} to /compose/vcf: ") as err:
        client.compose("vcf", {"prompt": "a fox"})
    assert err.value.status == answer[0] and client.retries == 0 and len(scripted.seen) == 1


def test_retries_stop_after_the_attempts(server):
    scripted = server([BUSY] * 5)
    client = _client(scripted.url, attempts=3)
    with pytest.raises(RequestError, match="answered 503") as err:
        client.compose("vcf", {"prompt": "a fox"})
    assert err.value.status == 503 and client.retries == 2 and len(scripted.seen) == 3


def test_an_unreachable_service_is_retried_then_named(server):
    scripted = server([])
    url = scripted.url
    scripted.shutdown()
    scripted.server_close()
    client = _client(url, attempts=2)
    with pytest.raises(RequestError, match=f"{url} did not answer POST /compose/vcf .* after 2 tries"):
        client.compose("vcf", {"prompt": "a fox"})
    assert client.retries == 1


def test_vgrt_request_writes_the_png_and_reports_the_retries(server, examples, tmp_path, capsys):
    scripted = server([BUSY])
    out = tmp_path / "out.png"
    args = ["request", "vcf", "--prompt", "a fox", "--reference", str(examples / "subject.png"), "--steps", "2"]
    assert main([*args, "--url", scripted.url, "--out", str(out)]) == 0
    assert out.read_bytes() == PNG and "1 retries" in capsys.readouterr().out
    body = scripted.seen[-1][2]
    assert (examples / "subject.png").read_bytes() in body and b'name="steps"\r\n\r\n2\r\n' in body


def test_vgrt_request_errors_write_nothing(server, examples, tmp_path, capsys):
    scripted = server([_vgrt_error(400, "--steps 0 must be >= 1")])
    out = tmp_path / "out.png"
    args = ["request", "vcf", "--prompt", "a fox", "--reference", str(examples / "subject.png")]
    assert main([*args, "--url", scripted.url, "--out", str(out)]) == 2
    assert "answered 400 to /compose/vcf: --steps 0 must be >= 1" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "missing.png"), "--url", scripted.url, "--out", str(out)]) == 2
    assert "input 'reference': the file" in capsys.readouterr().err and len(scripted.seen) == 1
    assert main([*args, "--url", scripted.url, "--out", str(tmp_path / "out.jpg")]) == 2
    assert not out.exists()


def test_an_answer_later_than_the_timeout_is_not_retried(server):
    scripted = server([])
    scripted.delay_s = 1.0
    client = Client(scripted.url, timeout_s=0.2, retry=Retry(attempts=3, backoff_s=0.01), sleep=lambda _: None)
    with pytest.raises(RequestError, match="did not answer POST /compose/vcf within 0.2 s"):
        client.compose("vcf", {"prompt": "a fox"})
    assert client.retries == 0 and len(scripted.seen) == 1


def test_attempts_below_one_are_refused():
    from vgrt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="attempts must be a whole number >= 1, got 0"):
        Retry(attempts=0)
