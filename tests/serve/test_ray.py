"""`vgrt serve` on Ray Serve, end to end on the tiny preset. Each scenario (tests/serve/ray_scenarios.py)
runs in a network namespace with only loopback, made here with `unshare --net` (root needed), so Ray
never listens on the machine's routable address, and in its own PID namespace, so every Ray process
ends with the scenario (Ray is also shut down inside it). A scenario takes about a minute on a 2-core
machine: marked slow."""

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vgrt.cli import main

from ..cli_args import mca_ctrl_args

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray[serve]: pip install 'vgrt[serve]'"),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
        reason="needs root, unshare and ip to give Ray a loopback-only network namespace",
    ),
]


def run_scenario(name: str, out: Path, cache: Path, examples: Path, *settings: str, timeout_s: int = 600) -> dict:
    """The scenario's results; Ray lives and dies in the namespaces (they end with the scenario's process).
    Ray's token authentication is on, with a token made for this run."""
    command = [sys.executable, "-m", "tests.serve.ray_scenarios", name, str(out), str(cache), str(examples), *settings]
    script = "ip link set lo up && " + " ".join(map(shlex.quote, command))
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    namespace = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script]
    done = subprocess.run(namespace, check=False, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    assert done.returncode == 0 and "error" not in result, f"{result.get('error')}\n{done.stderr[-3000:]}"
    return result


def test_served_mca_ctrl_matches_compose_refuses_bad_input_and_pushes_back(tmp_path, examples, composer_cache):
    cli_png = tmp_path / "cli.png"
    assert (
        main(
            mca_ctrl_args(examples, cli_png, "--seed", "7", "--backend", "onnxruntime", "--cache", str(composer_cache))
        )
        == 0
    )
    result = run_scenario("basic", tmp_path / "basic.json", composer_cache, examples)
    assert (tmp_path / "basic.png").read_bytes() == cli_png.read_bytes()  # same inputs, seed and threads
    assert result["request_id"] == "vgrt-test-1"  # echoed by the service
    status, message = result["malformed"]
    assert status == 400 and "--size 30x30 (tiny preset) width 30 is not usable" in message
    assert result["after_malformed"] == 200
    assert 503 in result["burst_statuses"] and set(result["burst_statuses"]) <= {200, 503}
    assert result["retried_burst"]["succeeded"] == 6 and result["retried_burst"]["retries"] > 0


def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(tmp_path, examples, composer_cache):
    result = run_scenario("kill", tmp_path / "kill.json", composer_cache, examples, "seconds=30")
    load = result["load"]
    assert result["replicas_before"] == 2 and result["killed"]
    assert load["failed"] == 0 and load["completed"] > 0, load["failures"]
    assert result["replicas_after"] == 2


def test_graceful_shutdown_finishes_the_requests_in_flight(tmp_path, examples, composer_cache):
    result = run_scenario("drain", tmp_path / "drain.json", composer_cache, examples, "deadline_s=60")
    assert result["in_flight_at_shutdown"] == 2 and result["statuses"] == [200, 200]
    assert result["delete_s"] < 60


@pytest.mark.parametrize("scenario", ["cli", "config"])  # `vgrt serve` options, or a Ray Serve config file
def test_vgrt_serve_in_the_foreground_answers_vgrt_request(tmp_path, examples, composer_cache, scenario):
    cli_png = tmp_path / "cli.png"
    assert (
        main(
            mca_ctrl_args(examples, cli_png, "--seed", "7", "--backend", "onnxruntime", "--cache", str(composer_cache))
        )
        == 0
    )
    result = run_scenario(scenario, tmp_path / "served.json", composer_cache, examples)
    assert result["request"]["exit_code"] == 0 and "0 retries" in result["request"]["output"]
    assert (tmp_path / "served.png").read_bytes() == cli_png.read_bytes()
    assert result["exit_code"] == 0  # Ctrl-C drained and stopped it
    if scenario == "cli":  # --metrics-port: vgrt's stage metric on the node's Prometheus endpoint
        stages = result["metrics"]["ray_vgrt_stage_seconds_count"]
        assert _sample(stages, method="mca-ctrl", stage="denoise") == 1


def test_two_nodes_two_replicas_both_serve(tmp_path, examples, composer_cache):
    result = run_scenario("two_nodes", tmp_path / "two.json", composer_cache, examples, "seconds=15")
    load, answers = result["load"], result["answers_per_replica"]
    assert result["nodes"] == 2 and load["failed"] == 0
    assert len(answers) == 2 and min(answers.values()) > 0
    assert len({replica.split("@")[1] for replica in answers}) == 2  # one replica on each node


def _sample(lines: list[str], **labels: str) -> float:
    """The value of the one exposition line among `lines` carrying every label in `labels`."""
    wanted = [f'{name}="{value}"' for name, value in labels.items()]
    found = [line for line in lines if all(label in line for label in wanted)]
    assert len(found) == 1, f"{len(found)} lines with {wanted}: {lines}"
    return float(found[0].rsplit(" ", 1)[1])


def test_a_batch_composes_each_request_as_compose_does_and_prometheus_shows_the_stages(
    tmp_path, examples, composer_cache
):
    from .ray_scenarios import BATCH_PROMPTS

    requests = 2
    for index in range(requests):  # first, so that the replica finds the exports made
        extra = ["--seed", str(index), "--prompt", BATCH_PROMPTS[index], "--backend", "onnxruntime"]
        assert main(mca_ctrl_args(examples, tmp_path / f"cli-{index}.png", *extra, "--cache", str(composer_cache))) == 0
    result = run_scenario("batch", tmp_path / "batch.json", composer_cache, examples, f"requests={requests}")
    served = [(tmp_path / f"batch-{index}.png").read_bytes() for index in range(requests)]
    assert served[0] != served[1]  # different prompts: a mix-up of rows between requests would show
    for index, png in enumerate(served):
        assert png == (tmp_path / f"cli-{index}.png").read_bytes(), f"request {index}"
    stages, sizes = result["metrics"]["ray_vgrt_stage_seconds_count"], result["metrics"]["ray_serve_actual_batch_size"]
    for stage in ("encode", "invert", "denoise", "decode"):  # scraped from Ray's Prometheus endpoint
        assert _sample(stages, method="mca-ctrl", stage=stage, deployment="tiny-onnxruntime-fp32") == requests
    batches = _sample([line for line in sizes if line.startswith("ray_serve_actual_batch_size_count")])
    assert batches >= 1 and _sample(sizes, le="1.0") == 0  # no batch of one: the requests were batched
