"""Serve the composition methods over HTTP on Ray Serve, in the foreground (Ctrl-C drains and stops).

Routes: POST /compose/<method> (the inputs of `vgrt compose <method>`, as multipart form or JSON; the
PNG back, with stage timings in X-Vgrt-Timings), GET /methods, and Ray Serve's /-/healthz and /-/routes.
With --config, Ray Serve's own config file is run instead (applications with
`import_path: vgrt.serve.app:app_builder`); its http_options give the address.
"""

import argparse
import signal
import threading

from vgrt.commands.compose import ATTENTION_ROUTES, add_checkpoint_options
from vgrt.engines import BACKENDS
from vgrt.precision import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--config", help="a Ray Serve config file (YAML) to run instead of the options below")
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto) rather than start a local one")
    parser.add_argument(
        "--metrics-port", type=int,
        help="Prometheus port of the local Ray node (Ray Serve's metrics and vgrt's ray_vgrt_stage_seconds at "
        "/metrics; default: Ray's choice). With --address, give it to `ray start --metrics-export-port`",
    )  # fmt: skip
    model = parser.add_argument_group("model (as `vgrt compose` takes it)")
    model.add_argument(
        "--preset", help="tiny, sd15, sd21 or sdxl (default: the --weights folder's own, else tiny, random weights)"
    )
    model.add_argument("--weights", help="local diffusers folder as published; its preset is read from its configs")
    add_checkpoint_options(model)
    model.add_argument(
        "--backend",
        choices=BACKENDS,
        help="default: openvino where it is installed, else onnxruntime (as vgrt compose)",
    )
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda for tensorrt, else cpu)")
    model.add_argument("--attention", choices=ATTENTION_ROUTES, help="tensorrt only (default: plugin)")
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the engines' arithmetic, as vgrt compose (default: fp16 on tensorrt, else fp32)",
    )
    model.add_argument("--cache", help="export cache directory (default: $VGRT_CACHE or ~/.cache/vgrt)")
    model.add_argument("--threads", type=int, default=0, help="inference threads per replica (default 0: all cores)")
    model.add_argument("--methods", default="", help="comma-separated methods to serve (default: all)")
    model.add_argument(
        "--warmup", default="compose", choices=("compose", "open"),
        help="before a replica is ready: one 2-step request per method (default), or only open the engines",
    )  # fmt: skip
    scale = parser.add_argument_group("replicas and requests")
    scale.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when autoscaling)")
    scale.add_argument("--max-replicas", type=int, default=0, help="autoscale up to this many (default 0: off)")
    scale.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    scale.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default: 0; 1 for tensorrt)")
    scale.add_argument(
        "--max-ongoing", type=int, help="requests one replica holds at once (default: 2, or --max-batch if larger)"
    )
    scale.add_argument("--max-queued", type=int, default=8, help="requests waiting for a replica; more get 503")
    scale.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets 408")
    scale.add_argument("--max-body-mb", type=float, default=32.0, help="request size limit in MiB (default: 32)")
    scale.add_argument("--drain-timeout", type=float, default=60.0, help="seconds in-flight requests get on shutdown")
    batch = parser.add_argument_group("batching (off by default: on CPU it does not pay)")
    batch.add_argument(
        "--max-batch", type=int, default=1,
        help="compose up to N requests together, merging their UNet calls where shapes allow (default: 1, off)",
    )  # fmt: skip
    batch.add_argument(
        "--batch-wait-ms", type=float, default=10.0,
        help="how long a batch waits for more requests, and a UNet call for its batch's (default: 10)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from vgrt.engines import default_backend
    from vgrt.errors import InvalidInputError
    from vgrt.serve.app import Scaling, build_app
    from vgrt.serve.service import ServeSettings

    if args.config:
        return _run_config(args.config)
    settings = ServeSettings(
        preset=args.preset, weights=args.weights, adapters=tuple(args.adapter or ()), allow_pickle=args.allow_pickle,
        backend=args.backend or default_backend(), device=args.device, attention=args.attention,
        precision=args.precision, cache=args.cache, threads=args.threads,
        methods=tuple(name for name in args.methods.split(",") if name), warmup=args.warmup,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
    )  # fmt: skip
    scaling = Scaling(
        replicas=args.replicas, max_replicas=args.max_replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        max_ongoing_requests=args.max_ongoing or max(2, args.max_batch), max_queued_requests=args.max_queued,
        drain_timeout_s=args.drain_timeout,
    )  # fmt: skip
    if args.metrics_port and args.address:
        raise InvalidInputError(
            f"--metrics-port {args.metrics_port} sets the port of the Ray node vgrt serve starts, not of the cluster "
            f"at --address {args.address}; give it to that node's `ray start --metrics-export-port` instead"
        )
    app = build_app(settings, scaling)  # every setting is checked here, before Ray starts
    ray, serve = _start_ray(args)
    try:
        print(f"vgrt serve: starting {settings.name} ({args.replicas} replica(s)); warming the engines")
        serve.run(app, name="vgrt", route_prefix="/")  # returns once every replica is warm
        print(f"vgrt serve: ready on http://{args.host}:{args.port} (POST /compose/<method>); Ctrl-C to stop")
        _wait_for_stop()
        print(f"vgrt serve: draining the requests in flight (up to {args.drain_timeout:g} s), then stopping")
        serve.delete("vgrt")  # returns once the replicas have finished their requests (or the deadline passed)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _start_ray(args: argparse.Namespace):
    from vgrt._lazy import require

    ray, serve = require("ray"), require("ray.serve")
    metrics = {"_metrics_export_port": args.metrics_port} if args.metrics_port else {}
    ray.init(address=args.address, include_dashboard=False, configure_logging=False, **metrics)
    http_options = {"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout}
    serve.start(proxy_location="HeadOnly", http_options=http_options)
    return ray, serve


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _run_config(path: str) -> int:
    """Ray Serve's own `serve run FILE`, in this process."""
    from pathlib import Path

    from vgrt._lazy import require
    from vgrt.errors import InvalidInputError

    if not Path(path).is_file():
        raise InvalidInputError(f"--config {path!r} is not a file; give a Ray Serve config file (YAML)")

    cli = require("ray.serve.scripts").cli
    cli.main(args=["run", path], prog_name="vgrt serve --config", standalone_mode=False)
    return 0
