"""The Ray Serve application: one deployment per model, backend and precision, each replica holding a
warm `ComposeService`.

    from vgrt.serve.app import Scaling, build_app
    from vgrt.serve.service import ServeSettings

    app = build_app(ServeSettings(preset="tiny"), Scaling(replicas=2))
    serve.run(app, route_prefix="/")          # returns once every replica is warm

In a Ray Serve config file (`vgrt serve --config FILE`, `serve run FILE`, or a KubeRay RayService), an
application is `import_path: vgrt.serve.app:app_builder` with `args` holding ServeSettings and Scaling
fields (`preset`, `backend`, `replicas`, `num_gpus`, ...); the config's own `deployments:` overrides apply
to the deployment named `ServeSettings.name` (e.g. `tiny-onnxruntime-fp32`).

Batching (`max_batch` > 1): `@serve.batch` hands a replica's requests to it in batches of up to
`max_batch`, gathered for at most `batch_wait_ms`; the requests of a batch compose together and their
UNet calls merge (vgrt.serve.service). A replica holds a batch only if `max_ongoing_requests` lets it.

Backpressure: a replica takes `max_ongoing_requests` at once (it composes one at a time, in order, or
one batch at a time); up to `max_queued_requests` more wait in the proxy; beyond that the proxy answers
503, which `vgrt.client` retries. The request timeout is the proxy's (`http_options.request_timeout_s`, 408).
Ray echoes the request id as `X-Request-ID` (the client may set it), and the replica's log lines carry it;
`X-Vgrt-Replica` names the replica that answered and its node (`replica@node`).
"""

import logging
import uuid
from dataclasses import dataclass, fields
from typing import Any

from vgrt._lazy import require
from vgrt.errors import InvalidInputError
from vgrt.serve.protocol import HttpError, Reply, read_body
from vgrt.serve.service import ComposeService, ServeSettings

log = logging.getLogger("vgrt.serve")


@dataclass(frozen=True)
class Scaling:
    """Replicas and their resources.

    replicas: replicas started (the minimum when autoscaling). max_replicas: above `replicas`, Ray Serve
    autoscales up to it on ongoing requests (target: `target_ongoing_requests` per replica).
    num_cpus, num_gpus: Ray resources of each replica (num_gpus 1 for a TensorRT replica).
    max_ongoing_requests: requests one replica holds at once. max_queued_requests: requests waiting in a
    proxy for a replica; more are answered 503.
    drain_timeout_s: on shutdown or scale-down, how long a replica may finish its requests in flight.
    """

    replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 1.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 2
    max_queued_requests: int = 8
    drain_timeout_s: float = 60.0

    def check(self) -> None:
        for name in ("replicas", "max_ongoing_requests", "max_queued_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise InvalidInputError(
                f"max_replicas {self.max_replicas} is below replicas {self.replicas}; raise it, or 0 for no autoscaling"
            )
        for name in ("num_cpus", "num_gpus", "drain_timeout_s"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment` keyword arguments."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "graceful_shutdown_timeout_s": self.drain_timeout_s,
            "health_check_period_s": 10,
        }
        if self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }  # fmt: skip
        else:
            options["num_replicas"] = self.replicas
        return options


class ComposeDeployment:
    """A Ray Serve replica: its service is made and warmed in __init__, so Ray reports the replica
    ready (and routes to it) only once its engines are open and have run."""

    def __init__(self, settings: ServeSettings) -> None:
        _log_requests()
        replica_id = require("ray.serve").get_replica_context().replica_id.unique_id
        self.replica = f"{replica_id}@{require('ray').get_runtime_context().get_node_id()[:12]}"  # replica@node
        self.stage_seconds = _stage_histogram()
        self.service = ComposeService(settings, observe=self._record)
        if settings.max_batch > 1:
            batch = require("ray.serve").batch(
                max_batch_size=settings.max_batch, batch_wait_timeout_s=settings.batch_wait_ms / 1000
            )
            self.service.batch = batch(self.service.compose_batch)
        seconds = self.service.load()
        log.info("%s ready in %.1f s (methods: %s)", settings.name, seconds, ", ".join(self.service.methods))

    async def __call__(self, request) -> Any:
        from starlette.responses import Response

        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex  # Ray's proxy sets it
        try:
            body = await read_body(request.stream(), request.headers, self.service.settings.max_body_bytes)
        except HttpError as err:
            reply = Reply.error(err, request_id)
        else:
            path = _route_path(request.scope)
            reply = await self.service.handle(request.method, path, request.headers, body, request_id)
        # Which replica answered: to match a reply with its replica's log, and to see load spread across replicas.
        return Response(reply.body, status_code=reply.status, headers={**reply.headers, "x-vgrt-replica": self.replica})

    def _record(self, method: str, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.observe(value, tags={"method": method, "stage": stage})

    def check_health(self) -> None:
        if self.service.composer is None:
            raise RuntimeError("the composer is not loaded")

    def __del__(self) -> None:
        self.service.close()


def _stage_histogram():
    """vgrt's per-stage timings beside Ray Serve's own metrics (Prometheus: `ray_vgrt_stage_seconds`)."""
    metrics = require("ray.serve.metrics")
    boundaries = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
    description = "seconds of each composition stage (encode, invert, denoise, decode, ...) per method"
    return metrics.Histogram("vgrt_stage_seconds", description, boundaries=boundaries, tag_keys=("method", "stage"))


def _route_path(scope: dict[str, Any]) -> str:
    """The request path below the application's route prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _log_requests() -> None:
    """Replica processes have no logging set up: send vgrt.serve's request lines to stderr (Ray's replica log)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def build_app(settings: ServeSettings, scaling: Scaling | None = None):
    """The Ray Serve application serving `settings` (a `ray.serve.Application`); checked before Ray starts."""
    serve = require("ray.serve")
    scaling = scaling or Scaling()
    settings.check()
    scaling.check()
    if settings.max_batch > scaling.max_ongoing_requests:
        raise InvalidInputError(
            f"max_batch {settings.max_batch} is above max_ongoing_requests {scaling.max_ongoing_requests}: a replica "
            f"holds at most max_ongoing_requests requests, so no batch could fill; raise it to {settings.max_batch}"
        )
    deployment = serve.deployment(ComposeDeployment, name=settings.name, **scaling.deployment_options())
    return deployment.bind(settings)


def app_builder(args: dict[str, Any]):
    """The application of a Ray Serve config file's `import_path: vgrt.serve.app:app_builder`; `args` holds
    ServeSettings and Scaling fields by name."""
    scaling_names = {f.name for f in fields(Scaling)}
    scaling = Scaling(**{name: value for name, value in args.items() if name in scaling_names})
    settings = ServeSettings.from_mapping({name: value for name, value in args.items() if name not in scaling_names})
    return build_app(settings, scaling)
