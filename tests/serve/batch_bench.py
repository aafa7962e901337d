"""Does batching pay? Measures merged UNet calls against one request at a time, without Ray (the
replica's own code path: `ComposeService`), and writes a bench results JSON:

    python -m tests.serve.batch_bench bench/results/serve-batch-tiny-<UTC>.json --backend onnxruntime

1. engine scaling: the plain UNet's seconds per call at 2, 4 and 8 rows, at the preset's opt and max
   latent sizes. Merging k requests of 2 rows pays at the engine only where a call of 2k rows costs less
   than k calls of 2 rows (`merged_cost_ratio` < 1): what a GPU's idle width gives and a CPU's does not.
2. service rounds: `requests` requests sent at once to a service composing one at a time (max_batch 1)
   and to one composing them together (max_batch = requests), rounds alternated so both meet the same
   machine load; round seconds, mean latency, the merger's counts, and whether every PNG is bit for bit
   the unbatched one.

Every loop is bounded by its count (`--rounds`, `--repeats`).
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

CASES = (("locref", 4), ("mca-ctrl", 2))  # method, requests per round (locref: 2 rows each, 4 fill 8)


def engine_scaling(composer, repeats: int) -> list[dict]:
    """Median seconds of the plain UNet at 2, 4 and 8 rows, per latent size; rows alternated per repeat."""
    from vgrt.export.feeds import random_feed

    runner, profile = composer.runner("unet"), composer.preset.profile
    found = []
    for latent in sorted({profile.latent.opt, profile.latent.max}):
        feeds = {}
        for rows in (2, 4, 8):
            sizes = {**runner.spec.profile_sizes("opt"), "batch": rows, "height": latent, "width": latent}
            feeds[rows] = {name: value.to(composer.device) for name, value in random_feed(runner.spec, sizes).items()}
            runner.infer(feeds[rows])  # warm this shape
        samples = {rows: [] for rows in feeds}
        for _ in range(repeats):
            for rows, feed in feeds.items():
                started = time.perf_counter()
                runner.infer(feed, validate=False)
                if composer.device.type == "cuda":
                    torch.cuda.synchronize()
                samples[rows].append(time.perf_counter() - started)
        median = {rows: statistics.median(values) for rows, values in samples.items()}
        found.append({
            "latent": latent, "seconds_per_call": median,
            "merged_cost_ratio": {rows: median[rows] / (rows // 2 * median[2]) for rows in (4, 8)},
        })  # fmt: skip
    return found


def _inputs(method, examples, index: int) -> dict:
    """A benchmark request of `method` with its own seed (and prompt, where it takes one), as bytes."""
    from vgrt.runtime.methods.registry import Work
    from vgrt.serve.protocol import FILE_INPUTS

    values = next(iter(method.benchmarks.values()))(examples, Work(steps=10, gradient_steps=1))
    values["seed"] = index
    if any(option.name == "prompt" for option in method.options):
        values["prompt"] = f"request {index}"

    def read(value):
        return (
            [Path(item).read_bytes() for item in value] if isinstance(value, list | tuple) else Path(value).read_bytes()
        )

    return {name: read(value) if name in FILE_INPUTS else value for name, value in values.items()}


async def _round(service, method: str, requests: list[dict]) -> tuple[float, list[float], list[bytes]]:
    """Send `requests` at once: the round's seconds, each request's seconds, each PNG."""
    from vgrt.client import multipart

    async def one(index: int, inputs: dict):
        body, content_type = multipart(inputs)
        started = time.perf_counter()
        reply = await service.handle("POST", f"/compose/{method}", {"content-type": content_type}, body, f"b{index}")
        assert reply.status == 200, reply.body[:300]
        return time.perf_counter() - started, reply.body

    started = time.perf_counter()
    done = await asyncio.gather(*(one(index, inputs) for index, inputs in enumerate(requests)))
    return time.perf_counter() - started, [seconds for seconds, _ in done], [png for _, png in done]


def service_rounds(backend: str, cache: str, device: str | None, examples, rounds: int) -> list[dict]:
    """Per case, three services alternated round by round: one request at a time ('one_at_a_time'), the
    requests composed together with their UNet calls merged ('merged'), and together without merging
    ('concurrent': what the threads alone give, so that 'merged' over it is what merging gives)."""
    from vgrt.runtime.methods.registry import get_method
    from vgrt.serve.service import ComposeService, ServeSettings

    found = []
    for name, count in CASES:
        method = get_method(name)
        requests = [_inputs(method, examples, index) for index in range(count)]
        common = {"backend": backend, "cache": cache, "device": device, "methods": (name,), "threads": 1}
        services = {
            "one_at_a_time": ComposeService(ServeSettings(**common, max_batch=1)),
            "merged": ComposeService(ServeSettings(**common, max_batch=count, batch_wait_ms=10)),
            "concurrent": ComposeService(ServeSettings(**common, max_batch=count, batch_wait_ms=10)),
        }
        for service in services.values():
            service.load()
        services["concurrent"].merger.max_rows = 0  # every call alone
        reference = asyncio.run(_round(services["one_at_a_time"], name, requests))[2]
        services["merged"].merger.counts.clear()
        samples = {arm: {"round_s": [], "latency_s": []} for arm in services}
        identical = True
        try:
            for _ in range(rounds):
                for arm, service in services.items():
                    seconds, latencies, pngs = asyncio.run(_round(service, name, requests))
                    samples[arm]["round_s"].append(seconds)
                    samples[arm]["latency_s"] += latencies
                    identical &= pngs == reference
        finally:
            for service in services.values():
                service.close()
        arms = {
            arm: {
                "round_p50_s": statistics.median(values["round_s"]),
                "throughput_rps": count / statistics.median(values["round_s"]),
                "latency_p50_s": statistics.median(values["latency_s"]),
            }
            for arm, values in samples.items()
        }
        found.append({
            "method": name, "requests_per_round": count, "rounds": rounds, "steps": 10,
            "identical_to_unbatched": identical, "merger_counts": dict(services["merged"].merger.counts), **arms,
            **{f"throughput_merged_over_{arm}": arms["merged"]["throughput_rps"] / arms[arm]["throughput_rps"]
               for arm in ("one_at_a_time", "concurrent")},
        })  # fmt: skip
    return found


def main() -> None:
    from vgrt.bench.machine import library_versions, machine_info
    from vgrt.engines import thread_settings
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.examples import write_examples
    from vgrt.runtime.methods.registry import Examples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--device")
    parser.add_argument("--cache")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the services (threads=1)
    machine = machine_info()
    options = {"runner_options": thread_settings(args.backend, 1)} if args.device in (None, "cpu") else {}
    with Composer.from_preset(
        "tiny", backend=args.backend, cache=args.cache, progress=False, device=args.device or "cpu", **options
    ) as composer:
        scaling = engine_scaling(composer, args.repeats)
        size = composer.preset.profile.latent.opt * composer.preset.vae_factor
    with tempfile.TemporaryDirectory() as folder:
        write_examples(folder, size=size)
        rounds = service_rounds(
            args.backend, args.cache, args.device, Examples(Path(folder), size, composer.preset), args.rounds
        )
    machine["load_average_at_end"] = list(os.getloadavg())
    result = {
        "suite": "serve-batch", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine, "versions": library_versions(),
        "settings": {"preset": "tiny", "backend": args.backend, "device": args.device or "cpu", "threads": 1,
                     "rounds": args.rounds, "repeats": args.repeats, "batch_wait_ms": 10},
        "engine_scaling": scaling, "service": rounds,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
