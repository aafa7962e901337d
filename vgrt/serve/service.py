"""One model served: a Composer, warmed before it takes requests, and the compose route around it.

`ComposeService` knows nothing of Ray: `vgrt.serve.app` wraps it in a Ray Serve deployment, and tests
call it directly. Per request it parses the body (vgrt.serve.protocol), builds and validates the method's
request exactly as `vgrt compose` does (a refusal is a 400 with the CLI's message), then composes on the
service's one compose thread, so a replica runs one composition at a time and the rest wait in order.

With `max_batch` > 1, requests are composed in batches (`compose_batch`; the Ray deployment feeds it
through `@serve.batch`), each request on its own thread over the one Composer, and their UNet calls
merge into one engine call where their shapes allow it (vgrt.engines.merging). Each request still gets
its own image: bit for bit the unbatched one on onnxruntime and openvino, within fp32 round-off on
torch (bench/results/serve-batch-*.json). Off by default: on CPU it does not pay.
"""

import argparse
import asyncio
import base64
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vgrt.engines import default_backend, thread_settings
from vgrt.errors import InvalidInputError, VgrtError
from vgrt.serve.protocol import MAX_BODY_BYTES, HttpError, Reply, client_message, parse_inputs

log = logging.getLogger("vgrt.serve")

WARMUPS = ("compose", "open")  # one 2-step request per method, or only open its runners


@dataclass(frozen=True)
class ServeSettings:
    """What one deployment serves, as `vgrt compose` takes it (--preset, --weights, --adapter, --allow-pickle,
    --backend, --device, --attention, --precision, --cache), and how.

    threads: inference threads of the runners and of torch (0: the libraries choose).
    methods: the methods served (empty: all of the registry).
    warmup: 'compose' runs one 2-step request per method at the preset's native size before the
        service reports ready; 'open' only exports and opens their runners.
    max_body_bytes: request size limit (413 above it).
    max_batch: requests composed together, their UNet calls merged (1: one request at a time).
    batch_wait_ms: how long a batch waits for more requests, and a UNet call for the batch's other calls.
    """

    preset: str | None = None  # None: the weights folder's own, else tiny
    weights: str | None = None
    adapters: tuple[str, ...] = ()
    allow_pickle: bool = False
    backend: str = field(default_factory=default_backend)  # as `vgrt compose` chooses when none is named
    device: str | None = None
    attention: str | None = None
    precision: str | None = None
    cache: str | None = None
    threads: int = 0
    methods: tuple[str, ...] = ()
    warmup: str = "compose"
    max_body_bytes: int = MAX_BODY_BYTES
    max_batch: int = 1
    batch_wait_ms: float = 10.0

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any]) -> "ServeSettings":
        """Settings from a Ray Serve config file's `args` (or any mapping); unknown names are refused."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InvalidInputError(
                f"unknown serve settings {', '.join(map(repr, unknown))}; they are: {', '.join(names)}"
            )
        values = dict(given)
        if isinstance(values.get("methods"), str):
            values["methods"] = tuple(name for name in values["methods"].split(",") if name)
        if isinstance(values.get("adapters"), str):
            values["adapters"] = (values["adapters"],)
        return cls(
            **{**values, "methods": tuple(values.get("methods", ())), "adapters": tuple(values.get("adapters", ()))}
        )

    def source(self):
        """The model served: `vgrt compose`'s ModelSource for these settings."""
        from dataclasses import replace

        from vgrt.models.source import ModelSource

        source = ModelSource.from_options(self.preset, self.weights)
        return replace(source, adapters=self.adapters, allow_pickle=self.allow_pickle)

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is exported."""
        from vgrt.models.adapter_checkpoints import check_source_adapters
        from vgrt.runtime.methods.registry import get_method

        source = self.source()
        check_source_adapters(source, source.model_preset())  # a weights folder's configs are read here
        for name in self.methods:
            get_method(name)
        if self.warmup not in WARMUPS:
            raise InvalidInputError(f"warmup {self.warmup!r} is not one of: {', '.join(WARMUPS)}")
        for name, value in (("threads", self.threads), ("max_body_bytes", self.max_body_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "threads" else 1):
                raise InvalidInputError(
                    f"{name} must be a whole number >= {0 if name == 'threads' else 1}, got {value!r}"
                )
        self._check_batching()
        self.composer_options()

    def _check_batching(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InvalidInputError(f"max_batch must be a whole number >= 1 (1: no batching), got {self.max_batch!r}")
        wait = self.batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 10_000:
            raise InvalidInputError(f"batch_wait_ms must be a number of milliseconds in [0, 10000], got {wait!r}")

    def composer_options(self) -> dict[str, Any]:
        """The Composer's keyword settings, checked as `vgrt compose` checks --device, --attention and
        --precision (a device this machine lacks, a backend without TensorRT, bf16 without BF16 units)."""
        from vgrt.commands.compose import composer_options

        options = composer_options(self.backend, self.device, self.attention, self.precision)
        if self.threads:
            options["runner_options"].update(thread_settings(self.backend, self.threads))
        if self.backend == "openvino" and self.max_batch > 1:  # merged calls vary in rows: one dynamic model
            options["runner_options"]["static_shapes"] = False
        return options

    @property
    def name(self) -> str:
        """The deployment's name: model, backend and precision, e.g. 'tiny-onnxruntime-fp32'."""
        from vgrt.precision import default_precision

        return f"{self.source().model_preset().name}-{self.backend}-{self.precision or default_precision(self.backend)}"


class ComposeService:
    """The compose routes of one model. `load()` makes and warms the Composer; `handle` answers requests.

    observe: called with (method name, stage seconds) after each composition (the Ray deployment records
    them as Prometheus metrics)."""

    def __init__(self, settings: ServeSettings, observe: Callable[[str, dict[str, float]], None] | None = None) -> None:
        from vgrt.runtime.methods.registry import METHODS, get_method

        settings.check()
        self.settings = settings
        self.preset = settings.source().model_preset()
        self.methods = {name: get_method(name) for name in settings.methods or METHODS}
        self.composer = None
        self.observe = observe
        self._compose_thread: ThreadPoolExecutor | None = None
        self.merger = None  # a CallMerger when batching
        # How a batched request is composed: a batch of its own by default; the Ray deployment puts
        # `@serve.batch` in front of `compose_batch`, so requests that arrive together start together.
        self.batch: Callable[[Job], Awaitable[Any]] = self._batch_of_one

    def load(self) -> float:
        """Export, open and warm every served method's engines; the seconds it took."""
        import torch

        started = time.perf_counter()
        self.composer = self._composer()
        # torch's thread count is per thread: the compose threads take this one's, so that a composition
        # gives the pixels `vgrt compose` gives with the same thread count.
        threads = torch.get_num_threads()
        self._compose_thread = ThreadPoolExecutor(
            self.settings.max_batch, "vgrt-compose", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._compose_thread.submit(self._warm).result()
        return time.perf_counter() - started

    def close(self) -> None:
        if self._compose_thread is not None:
            self._compose_thread.shutdown(wait=True)  # the compositions in flight finish first
        if self.composer is not None:
            self.composer.close()

    def _composer(self):
        """The Composer `vgrt compose` would make from the same options."""
        import torch

        from vgrt.checks import check_writable_folder
        from vgrt.engines.merging import CallMerger
        from vgrt.export.cache import cache_root
        from vgrt.runtime.composer import Composer

        s = self.settings
        check_writable_folder(s.cache or cache_root(), "the cache")
        if s.threads:
            torch.set_num_threads(s.threads)
        if s.max_batch > 1:
            self.merger = CallMerger(self.preset.profile.batch.max, s.batch_wait_ms / 1000)
        hook = self.merger.hook if self.merger else None
        return Composer(s.source(), s.backend, cache=s.cache, progress=False, runner_hook=hook, **s.composer_options())

    def _warm(self) -> None:
        if self.settings.warmup == "open":
            for method in self.methods.values():
                self.composer.open(*method.components)
                self.composer.runner("unet", method.features)
            return
        from vgrt.runtime.examples import write_examples
        from vgrt.runtime.methods.registry import Examples, Work

        size = self.preset.profile.latent.opt * self.preset.vae_factor
        with tempfile.TemporaryDirectory(prefix="vgrt-warmup-") as folder:
            write_examples(folder, size=size)
            examples = Examples(Path(folder), size, self.preset)
            for method in self.methods.values():
                benchmark = next(iter(method.benchmarks.values()))
                # 2 steps: the fewest every method takes (AIComposer inverts one and samples the other)
                request = method.request(benchmark(examples, Work(steps=2, gradient_steps=1)), self.preset)
                method.compose(self.composer, request)

    async def handle(self, verb: str, path: str, headers: Mapping[str, str], body: bytes, request_id: str) -> Reply:
        """Answer one HTTP request; never raises (errors become 4xx/5xx replies without server internals)."""
        started = time.perf_counter()
        try:
            reply = await self._route(verb, path, headers, body, request_id)
        except HttpError as err:
            reply = Reply.error(err, request_id)
        except Exception:  # the client gets a 500 without internals; the log has the traceback
            log.exception("request %s failed", request_id)
            reply = Reply.error(
                HttpError(500, f"internal error; the server log has it under request {request_id}"), request_id
            )
        log.info(
            "request %s %s %s -> %d in %.3f s", request_id, verb, path, reply.status, time.perf_counter() - started
        )
        return reply

    async def _route(self, verb: str, path: str, headers: Mapping[str, str], body: bytes, request_id: str) -> Reply:
        parts = [part for part in path.split("/") if part]
        if parts == ["methods"] and verb == "GET":
            return Reply.json(200, {"methods": {name: _described(method) for name, method in self.methods.items()}})
        if len(parts) != 2 or parts[0] != "compose":
            raise HttpError(
                404, f"no route {path!r}; POST /compose/<method> (methods: {', '.join(self.methods)}) or GET /methods"
            )
        if verb != "POST":
            raise HttpError(405, f"{path} takes POST, not {verb}")
        if parts[1] not in self.methods:
            raise HttpError(404, f"method {parts[1]!r} is not served here; the methods are: {', '.join(self.methods)}")
        if len(body) > self.settings.max_body_bytes:
            raise HttpError(
                413, f"the request body is {len(body)} bytes; this server takes at most {self.settings.max_body_bytes}"
            )
        if self.composer is None:
            raise HttpError(503, "the model is still loading; retry shortly")
        return await self._compose(self.methods[parts[1]], headers, body, request_id)

    async def _compose(self, method, headers: Mapping[str, str], body: bytes, request_id: str) -> Reply:
        with tempfile.TemporaryDirectory(prefix="vgrt-request-") as folder:
            folder = Path(folder)
            repeated = frozenset(option.name for option in method.options if option.repeated)
            inputs = parse_inputs(headers.get("content-type", ""), body, folder, repeated)
            # Checked off the compose thread, so a refusal does not wait behind the compositions queued there.
            request = await asyncio.to_thread(self._request, method, inputs, folder)
            png, seconds = await self._composed(Job(method, request, folder))
        timings = {stage: round(value, 4) for stage, value in seconds.items()}
        log.info("request %s %s composed: %s", request_id, method.name, timings)
        if self.observe is not None:
            self.observe(method.name, seconds)
        if "application/json" in headers.get("accept", ""):
            image = base64.b64encode(png).decode()
            return Reply.json(
                200, {"request_id": request_id, "method": method.name, "timings": timings, "image": image}
            )
        return Reply(200, png, {"content-type": "image/png", "x-vgrt-timings": _json(timings)})

    async def _composed(self, job: "Job") -> tuple[bytes, dict[str, float]]:
        """The PNG and stage seconds of `job`, composed on a compose thread (in a batch when batching)."""
        if self.merger is None:
            loop = asyncio.get_running_loop()
            # Cancelling this await (client gone, request timeout) cancels the composition if it has not started.
            return await loop.run_in_executor(self._compose_thread, self._run, job.method, job.request, job.folder)
        outcome = await self.batch(job)
        if isinstance(outcome, BaseException):  # each request of a batch meets only its own error
            raise outcome
        return outcome

    async def compose_batch(self, jobs: list["Job"]) -> list[tuple[bytes, dict[str, float]] | BaseException]:
        """Compose `jobs` at once, each on its own compose thread; their UNet calls merge where they can.
        Returns each job's (PNG, stage seconds), or the exception it raised (not raised: a batch's other
        requests still get their images)."""
        loop = asyncio.get_running_loop()
        composing = [loop.run_in_executor(self._compose_thread, self._run_batched, job) for job in jobs]
        outcomes = await asyncio.gather(*composing, return_exceptions=True)
        log.info("batch of %d composed; UNet calls so far: %s", len(jobs), self.merger.counted())
        return outcomes

    async def _batch_of_one(self, job: "Job") -> tuple[bytes, dict[str, float]] | BaseException:
        return (await self.compose_batch([job]))[0]

    def _run_batched(self, job: "Job") -> tuple[bytes, dict[str, float]]:
        with self.merger.composing():
            return self._run(job.method, job.request, job.folder)

    def _request(self, method, inputs: dict[str, Any], folder: Path):
        """The method's request, checked as `vgrt compose` checks it; a refusal is a 400 with its message."""
        from vgrt.checks import check_seed

        try:
            check_seed(method.values(inputs).get("seed", 0), "seed")  # as `vgrt compose` checks --seed
            return method.request(inputs, self.preset)
        except InvalidInputError as err:
            raise HttpError(400, client_message(err, folder)) from None

    def _run(self, method, request, folder: Path) -> tuple[bytes, dict[str, float]]:
        from vgrt.commands.compose import provenance
        from vgrt.runtime.images import save_image

        try:
            result = method.compose(self.composer, request)
        except InvalidInputError as err:  # a check only the composition can make
            raise HttpError(400, client_message(err, folder)) from None
        except VgrtError as err:
            log.exception("compose failed")
            raise HttpError(
                500, f"the composition failed ({type(err).__name__}); the server log has the details"
            ) from None
        out = folder / "out.png"
        args = argparse.Namespace(method=method.name, precision=self.settings.precision)  # as `vgrt compose` has them
        save_image(result.image, out, provenance(args, request, self.composer))
        return out.read_bytes(), dict(result.times.seconds)


@dataclass(frozen=True)
class Job:
    """One request to compose: its method, checked request, and the folder its input files are in."""

    method: Any
    request: Any
    folder: Path


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _described(method) -> dict[str, Any]:
    """A method's inputs, for GET /methods."""
    from vgrt.serve.protocol import FILE_INPUTS

    return {
        "summary": method.summary,
        "inputs": {
            option.name: {
                "help": option.help, "kind": "file" if option.name in FILE_INPUTS else option.type.__name__,
                "required": option.required, "repeated": option.repeated, "default": option.default,
                **({"choices": list(option.choices)} if option.choices else {}),
                **({"one_of": option.one_of} if option.one_of else {}),
            }
            for option in method.options
        },
    }  # fmt: skip
