"""Run one exported component on several backends with the same random inputs and compare them."""

import argparse

from vgrt.engines import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an exported directory (from `vgrt export`)")
    parser.add_argument("--component", default="unet")
    parser.add_argument(
        "--backends", default="torch,onnxruntime",
        help=f"two or more of {','.join(BACKENDS)}, comma-separated; the first is the reference "
        "(default: torch,onnxruntime)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--rtol", type=float, help="fail above this relative error (default: 1e-4 fp32, 1e-2 fp16)")


def run(args: argparse.Namespace) -> int:
    import math
    import time

    from vgrt.checks import check_seed
    from vgrt.engines import open_runner
    from vgrt.errors import InvalidInputError
    from vgrt.export import example_feed
    from vgrt.export.manifest import read_manifest

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if len(backends) < 2 or unknown:
        raise InvalidInputError(f"--backends needs two or more of: {', '.join(BACKENDS)}; got {args.backends!r}")
    check_seed(args.seed, "--seed")
    if args.rtol is not None and not (math.isfinite(args.rtol) and args.rtol > 0):
        raise InvalidInputError(f"--rtol must be a finite number > 0, got {args.rtol}")
    manifest = read_manifest(args.directory)
    rtol = args.rtol or (1e-2 if manifest.data["settings"]["dtype"] == "fp16" else 1e-4)
    feed = example_feed(args.directory, args.component, seed=args.seed)
    results = {}
    for backend in backends:
        with open_runner(args.directory, args.component, backend) as runner:
            started = time.perf_counter()
            results[backend] = runner.infer(feed)
            print(f"{backend:<12} {1e3 * (time.perf_counter() - started):9.1f} ms (one call, not a benchmark)")
    reference, worst = results[backends[0]], 0.0
    for backend in backends[1:]:
        for name, expected in reference.items():
            expected = expected.double().cpu()  # backends may return their outputs on different devices
            got = results[backend][name].double().cpu()
            error = ((got - expected).norm() / expected.norm()).item()
            worst = max(worst, error)
            print(f"{name}: {backend} vs {backends[0]} relative error {error:.2e} (limit {rtol:.0e})")
    print("PASS" if worst <= rtol else "FAIL")
    return 0 if worst <= rtol else 1
