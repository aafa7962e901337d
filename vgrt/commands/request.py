"""Compose an image on a `vgrt serve` service: the inputs of `vgrt compose <method>`, sent over HTTP."""

import argparse

from vgrt.commands.compose import _add_method_options
from vgrt.runtime.methods.registry import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", required=True)
    for method in METHODS.values():
        sub = methods.add_parser(method.name, help=method.summary, description=method.description or None)
        _add_method_options(sub, method)
        sub.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: http://127.0.0.1:8000)")
        sub.add_argument("--out", required=True, help="output image (.png); written only on success")
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer (default: 600)")
        sub.add_argument("--attempts", type=int, default=6, help="tries on 503 or a lost replica (default: 6)")
        sub.add_argument("--request-id", help="id of the request in the service's logs (default: a random one)")


def run(args: argparse.Namespace) -> int:
    from vgrt.checks import check_output_file
    from vgrt.client import Client, Retry

    out = check_output_file(args.out, "--out", (".png",))
    method = METHODS[args.method]
    inputs = {option.name: getattr(args, option.name) for option in method.options}
    client = Client(args.url, timeout_s=args.timeout, retry=Retry(attempts=args.attempts))  # checks --attempts
    result = client.compose(method.name, inputs, request_id=args.request_id)
    _write_atomically(out, result.png)
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
    print(f"wrote {out} (request {result.request_id}; {stages}; {result.retries} retries)")
    return 0


def _write_atomically(path, data: bytes) -> None:
    """A failed write leaves no file (as `vgrt compose` writes its image)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)
