"""Ray Serve scenarios, each run as its own process inside a loopback-only network namespace that
tests/serve/test_ray.py creates (Ray listens on the machine's routable address otherwise):

    unshare --net bash -c 'ip link set lo up && python -m tests.serve.ray_scenarios SCENARIO RESULT.json CACHE EXAMPLES [name=value ...]'

Each scenario starts one local Ray, serves the tiny preset, writes what it measured to RESULT.json, and
shuts Ray down whatever happens. Every loop is bounded in count and in time.
"""

import json
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError

from vgrt.client import Client, RequestError, Retry, multipart

PORT = 8321
URL = f"http://127.0.0.1:{PORT}"
METRICS_PORT = 8322
FILES = {"subject": "subject.png", "subject_mask": "subject_mask.png", "condition": "scene.png",
         "region_mask": "region_mask.png"}  # fmt: skip


def inputs(examples: Path, **extra) -> dict:
    return {name: (examples / file).read_bytes() for name, file in FILES.items()} | extra


def start(cache: str, scaling: dict, threads: int = 1, **serving):
    """Ray on this namespace's loopback, Serve on PORT, the tiny preset's mca-ctrl warm behind it
    (`serving`: more ServeSettings). Ray's Prometheus endpoint is http://127.0.0.1:METRICS_PORT/metrics."""
    import ray
    from ray import serve

    from vgrt.serve.app import Scaling, build_app
    from vgrt.serve.service import ServeSettings

    ray.init(
        num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
    )  # fmt: skip
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": 120})
    settings = ServeSettings(
        backend="onnxruntime", cache=cache, methods=("mca-ctrl",), warmup="open", threads=threads, **serving
    )
    started = time.perf_counter()
    serve.run(build_app(settings, Scaling(**scaling)), name="vgrt", route_prefix="/")
    return time.perf_counter() - started


def stop() -> float:
    import ray
    from ray import serve

    started = time.perf_counter()
    serve.shutdown()
    ray.shutdown()
    return time.perf_counter() - started


def raw_status(examples: Path, **extra) -> int:
    """One request without retries: its HTTP status."""
    body, content_type = multipart(inputs(examples, **extra))
    request = urllib.request.Request(f"{URL}/compose/mca-ctrl", body, {"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status
    except HTTPError as err:
        return err.code


def basic(examples: Path, cache: str, out: Path) -> dict:
    """Identical output, 4xx then still serving, request id echoed, backpressure 503 and client retries."""
    result = {"ready_s": start(cache, {"replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1})}
    client = Client(URL, timeout_s=120, retry=Retry(attempts=8, backoff_s=0.2))
    composed = client.compose("mca-ctrl", inputs(examples, steps=2, seed=7), request_id="vgrt-test-1")
    out.with_suffix(".png").write_bytes(composed.png)
    result["request_id"] = composed.request_id
    try:
        client.compose("mca-ctrl", inputs(examples, steps=1, size="30x30"))
    except RequestError as err:
        result["malformed"] = [err.status, str(err)]
    result["after_malformed"] = raw_status(examples, steps=1)
    with ThreadPoolExecutor(6) as pool:  # 1 composing + 1 queued; the other 4 are turned away
        result["burst_statuses"] = sorted(pool.map(lambda _: raw_status(examples, steps=3), range(6)))
    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(lambda _: client.compose("mca-ctrl", inputs(examples, steps=3)), range(6)))
    result["retried_burst"] = {"succeeded": len(done), "retries": client.retries}
    return result


def bench(examples: Path, cache: str, out: Path, replicas: int = 1, clients: int = 8, seconds: float = 30.0) -> dict:
    """Service overhead at the CLI's default steps, then `clients` closed-loop clients for `seconds`."""
    result = {"ready_s": start(cache, {"replicas": replicas, "max_ongoing_requests": 2, "max_queued_requests": 64})}
    client = Client(URL, timeout_s=300, retry=Retry(attempts=8, backoff_s=0.2))
    result["overhead"] = _overhead(client, examples, cache, runs=5)
    result["load"] = _load(client, examples, clients, seconds)
    result["stop_s"] = stop()
    return {"suite": "serve", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_machine(),
            "settings": {"preset": "tiny", "method": "mca-ctrl", "backend": "onnxruntime", "threads": 1,
                         "replicas": replicas, "nodes": 1}, **result}  # fmt: skip


def _overhead(client: Client, examples: Path, cache: str, runs: int) -> dict:
    """Served requests against two baselines at the CLI's default steps (50): the replica's own stage times
    of the same request, and `vgrt compose`'s work in this process, alternated with the served requests so
    both meet the same machine load."""
    import torch

    from vgrt.runtime.composer import Composer

    torch.set_num_threads(1)  # as the replicas (threads=1)
    served, composing, direct = [], [], []
    with Composer.from_preset("tiny", cache=cache, progress=False, runner_options={"intra_op_threads": 1}) as composer:
        _direct(composer, examples, steps=1)  # warm, as the replicas are
        for _ in range(runs):
            direct.append(_direct(composer, examples, steps=50))
            started = time.perf_counter()
            composed = client.compose("mca-ctrl", inputs(examples, seed=1))  # the CLI's default steps (50)
            served.append(time.perf_counter() - started)
            composing.append(sum(composed.timings.values()))
    return {
        "runs": runs, "served_p50_s": statistics.median(served), "direct_p50_s": statistics.median(direct),
        "replica_compose_p50_s": statistics.median(composing),
        "overhead_over_direct_p50": statistics.median(served) / statistics.median(direct) - 1,
        "overhead_over_replica_compose_p50": statistics.median(s - c for s, c in zip(served, composing))
        / statistics.median(composing),
    }  # fmt: skip


def _machine() -> dict:
    import os
    import platform

    import ray

    return {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "versions": {"ray": ray.__version__, "python": platform.python_version()}}  # fmt: skip


def _direct(composer, examples: Path, steps: int) -> float:
    """Seconds of `vgrt compose`'s work in this process: request, composition, PNG."""
    import tempfile

    from vgrt.commands.compose import provenance
    from vgrt.models.presets import get_preset
    from vgrt.runtime.images import save_image
    from vgrt.runtime.methods.registry import get_method

    method = get_method("mca-ctrl")
    given = {name: str(examples / file) for name, file in FILES.items()} | {"seed": 1, "steps": steps}
    started = time.perf_counter()
    request = method.request(given, get_preset("tiny"))
    composed = method.compose(composer, request)
    with tempfile.TemporaryDirectory() as folder:
        save_image(composed.image, Path(folder) / "out.png", provenance(_Args(), request, composer))
    return time.perf_counter() - started


class _Args:
    method = "mca-ctrl"


def _load(client: Client, examples: Path, clients: int, seconds: float, steps: int = 10, during=None) -> dict:
    """Closed-loop load: each client sends its next request when the last is answered, until `seconds`."""
    latencies, failures, lock = [], [], threading.Lock()
    retries_before = client.retries
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        for number in range(10_000):  # bounded; the deadline ends it first
            if time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            try:
                client.compose(
                    "mca-ctrl", inputs(examples, steps=steps, seed=number), request_id=f"load-{index}-{number}"
                )
            except RequestError as err:
                with lock:
                    failures.append(str(err)[:300])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join(timeout=seconds + 300)
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients, "seconds": round(elapsed, 2), "steps": steps, "completed": len(latencies),
        "failed": len(failures), "failures": failures[:5], "retries": client.retries - retries_before,
        "throughput_rps": len(latencies) / elapsed,
        "p50_s": statistics.median(ordered) if ordered else None,
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
    }  # fmt: skip


def kill(examples: Path, cache: str, out: Path, clients: int = 4, seconds: float = 30.0) -> dict:
    """Two replicas under load; one is killed; no request fails (the client retries) and it is replaced."""
    import ray

    result = {"ready_s": start(cache, {"replicas": 2, "max_ongoing_requests": 2, "max_queued_requests": 64})}
    client = Client(URL, timeout_s=300, retry=Retry(attempts=8, backoff_s=0.5))

    def kill_one() -> None:
        time.sleep(seconds / 3)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        result["replicas_before"] = len(names)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        result["killed"] = names[0].split("#")[-1]

    result["load"] = _load(client, examples, clients, seconds, steps=10, during=kill_one)
    result["replicas_after"] = _running_replicas(wait_s=60)
    result["stop_s"] = stop()
    return result


def _running_replicas(wait_s: float) -> int:
    """Replicas RUNNING once the deployment is healthy again (waits up to `wait_s`)."""
    from ray import serve

    deadline = time.perf_counter() + wait_s
    while True:
        deployment = next(iter(serve.status().applications["vgrt"].deployments.values()))
        running = deployment.replica_states.get("RUNNING", 0)
        if running == 2 or time.perf_counter() > deadline:
            return running
        time.sleep(1)


def drain(examples: Path, cache: str, out: Path, requests: int = 2, deadline_s: float = 60.0) -> dict:
    """Shutdown while requests are in flight: they finish (200) before the replica stops, within the deadline."""
    from ray import serve

    scaling = {"replicas": 1, "max_ongoing_requests": requests, "drain_timeout_s": deadline_s}
    result = {"ready_s": start(cache, scaling)}
    with ThreadPoolExecutor(requests) as pool:
        answers = [pool.submit(raw_status, examples, steps=20, seed=index) for index in range(requests)]
        time.sleep(3)  # the requests are in the replica by now
        result["in_flight_at_shutdown"] = sum(not answer.done() for answer in answers)
        started = time.perf_counter()
        serve.delete("vgrt")  # what Ctrl-C on `vgrt serve` does first: the app drains, then stops
        result["delete_s"] = time.perf_counter() - started
        result["statuses"] = [answer.result(timeout=deadline_s) for answer in answers]
    result["stop_s"] = stop()
    return result


def config(examples: Path, cache: str, out: Path, wait_s: float = 240.0) -> dict:
    """`vgrt serve --config FILE` (Ray Serve's config format) in the foreground, a request, then SIGINT."""
    import yaml

    settings = {"backend": "onnxruntime", "cache": cache, "methods": ["mca-ctrl"], "warmup": "open", "threads": 1,
                "max_queued_requests": 4}  # fmt: skip
    config_file = out.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": [{"name": "vgrt", "route_prefix": "/", "import_path": "vgrt.serve.app:app_builder",
                          "args": settings}],
    }))  # fmt: skip
    return _foreground(["serve", "--config", str(config_file)], examples, out, wait_s)


def cli(examples: Path, cache: str, out: Path, wait_s: float = 240.0) -> dict:
    """`vgrt serve` with its options in the foreground, `vgrt request`, then SIGINT."""
    options = ["--host", "127.0.0.1", "--port", str(PORT), "--backend", "onnxruntime", "--cache", cache,
               "--methods", "mca-ctrl", "--warmup", "open", "--threads", "1",
               "--metrics-port", str(METRICS_PORT)]  # fmt: skip
    return _foreground(["serve", *options], examples, out, wait_s, metrics=("ray_vgrt_stage_seconds_count",))


def _foreground(serve: list[str], examples: Path, out: Path, wait_s: float, metrics: tuple[str, ...] = ()) -> dict:
    """Run `vgrt <serve>` until it answers, compose with `vgrt request`, scrape the `metrics` families from
    METRICS_PORT, then stop it as Ctrl-C does."""
    import signal
    import subprocess

    log = out.with_suffix(".log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vgrt.cli", *serve], stdout=log, stderr=log)
    files = [part for name, file in FILES.items() for part in ("--" + name.replace("_", "-"), str(examples / file))]
    request = [sys.executable, "-m", "vgrt.cli", "request", "mca-ctrl", *files, "--steps", "2", "--seed", "7"]
    result = {}
    try:
        result["ready_s"] = _wait_ready(wait_s)
        done = subprocess.run(
            [*request, "--url", URL, "--out", str(out.with_suffix(".png"))], check=False, timeout=300,
            capture_output=True, text=True,
        )  # fmt: skip
        result["request"] = {"exit_code": done.returncode, "output": (done.stdout + done.stderr).strip()[-500:]}
        if metrics:
            result["metrics"] = _scraped(metrics, wait_s=60)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            result["exit_code"] = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            result["exit_code"] = "killed after 90 s"
    return result


def _wait_ready(wait_s: float) -> float:
    """Seconds until the vgrt app answers GET /methods (polled every second, at most `wait_s`)."""
    started = time.perf_counter()
    for _ in range(int(wait_s)):
        try:
            with urllib.request.urlopen(f"{URL}/methods", timeout=5) as reply:
                if reply.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the service did not answer GET /methods within {wait_s} s")


def two_nodes(
    examples: Path, cache: str, out: Path, replicas: int = 2, clients: int = 4, seconds: float = 20.0
) -> dict:
    """A head and a worker node (`ray start`, distinct ports, one CPU each), `replicas` replicas of one CPU
    (two: one on each node), under load."""
    import os
    import subprocess

    import ray
    from ray import serve

    from vgrt.serve.app import Scaling, build_app
    from vgrt.serve.service import ServeSettings

    # Token authentication on: both nodes and this driver share the cluster's token, which the caller sets
    # (Ray reads it when it is imported).
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        raise RuntimeError("run two_nodes with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set")
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = ["--head", "--port", "6390", "--include-dashboard", "false", "--ray-client-server-port", "10201"]
    for index, role in enumerate((head, ["--address", "127.0.0.1:6390"])):
        ports = ["--dashboard-agent-listen-port", str(52365 + 10 * index),
                 "--dashboard-agent-grpc-port", str(52366 + 10 * index),
                 "--runtime-env-agent-port", str(52367 + 10 * index), "--metrics-export-port", str(52368 + 10 * index),
                 "--min-worker-port", str(20000 + 1000 * index), "--max-worker-port", str(20999 + 1000 * index)]  # fmt: skip
        subprocess.run(["ray", "start", *role, *common, *ports], check=True, timeout=120, capture_output=True)
    try:
        ray.init(address="127.0.0.1:6390", configure_logging=False, log_to_driver=False)
        result = {"nodes": sum(node["Alive"] for node in ray.nodes()), "replicas": replicas}
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
        settings = ServeSettings(backend="onnxruntime", cache=cache, methods=("mca-ctrl",), warmup="open", threads=1)
        started = time.perf_counter()
        scaling = Scaling(replicas=replicas, num_cpus=1, max_ongoing_requests=2, max_queued_requests=64)
        serve.run(build_app(settings, scaling), name="vgrt", route_prefix="/")
        result["ready_s"] = time.perf_counter() - started
        client = Client(URL, timeout_s=300, retry=Retry(attempts=8, backoff_s=0.5))
        answered = []
        original = client.compose

        def recorded(*args, **kwargs):
            composed = original(*args, **kwargs)
            answered.append(composed.replica)
            return composed

        client.compose = recorded
        result["load"] = _load(client, examples, clients, seconds, steps=10)
        result["answers_per_replica"] = {replica: answered.count(replica) for replica in sorted(set(answered))}
        result["stop_s"] = stop()
    finally:  # the test runs this in its own PID namespace: `ray stop` sees only this cluster's processes
        subprocess.run(["ray", "stop", "--force"], check=False, timeout=120, capture_output=True)
    return result


BATCH_PROMPTS = ("a red ball", "a blue cube", "a green cone", "a white vase")


def batch(examples: Path, cache: str, out: Path, requests: int = 2, wait_s: float = 90.0) -> dict:
    """`requests` requests at once (prompt BATCH_PROMPTS[i], seed i) to a replica batching them
    (`@serve.batch`, UNet calls merged), each PNG written beside `out` for the test to compare with
    `vgrt compose`; then Ray's Prometheus endpoint, scraped until it shows vgrt's stage metric and Ray
    Serve's batch sizes (at most `wait_s`: Ray exports every few seconds)."""
    scaling = {"replicas": 1, "max_ongoing_requests": requests, "max_queued_requests": 8}
    result = {"ready_s": start(cache, scaling, max_batch=requests, batch_wait_ms=500)}
    client = Client(URL, timeout_s=120, retry=Retry(attempts=4, backoff_s=0.2))

    def compose(index: int):
        return client.compose("mca-ctrl", inputs(examples, steps=2, seed=index, prompt=BATCH_PROMPTS[index]))

    with ThreadPoolExecutor(requests) as pool:
        composed = list(pool.map(compose, range(requests)))
    for index, reply in enumerate(composed):
        out.with_name(f"{out.stem}-{index}.png").write_bytes(reply.png)
    result["metrics"] = _scraped(("ray_vgrt_stage_seconds_count", "ray_serve_actual_batch_size"), wait_s)
    return result


def _scraped(families: tuple[str, ...], wait_s: float) -> dict[str, list[str]]:
    """The exposition lines of `families` on Ray's Prometheus endpoint, once each has one (polled every
    2 s, at most `wait_s`)."""
    deadline = time.perf_counter() + wait_s
    found: dict[str, list[str]] = {}
    for _ in range(int(wait_s / 2) + 1):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        except OSError as err:
            text = f"# unreachable: {err}"
        found = {family: [line for line in text.splitlines() if line.startswith(family)] for family in families}
        if all(found.values()) or time.perf_counter() > deadline:
            break
        time.sleep(2)
    return found


SCENARIOS: dict[str, Callable[..., dict]] = {
    "basic": basic, "batch": batch, "bench": bench, "kill": kill, "drain": drain, "config": config, "cli": cli,
    "two_nodes": two_nodes,
}  # fmt: skip


def main(name: str, out: str, cache: str, examples: str, *settings: str) -> None:
    """Run scenario `name` with keyword `settings` (name=JSON value); its outcome, or its error, goes to `out`."""
    import ray

    options = {key: json.loads(value) for key, value in (setting.split("=", 1) for setting in settings)}
    outcome = {}
    try:
        outcome = SCENARIOS[name](Path(examples), cache, Path(out), **options)
    except Exception as err:  # noqa: BLE001 - reported in the JSON, which the test shows
        outcome = {"error": f"{type(err).__name__}: {err}"}
    finally:
        if ray.is_initialized():
            stop()
        Path(out).write_text(json.dumps(outcome, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
