"""Check this machine in one command, offline: the attention kernel, every method, the GPU backends."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU checks: kernel accuracy and speed at SD 1.5 / SDXL sizes, every method on torch CUDA "
        "against the CPU, TensorRT and ONNX Runtime CUDA where installed (default: the quick CPU checks)",
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated method benchmarks to run (default: all of the registry's)"
    )
    parser.add_argument("--out", default="bench/results", help="folder of the JSON report (default: bench/results)")


def run(args: argparse.Namespace) -> int:
    from vgrt.selftest import run_selftest, write_report

    def show(check) -> None:
        print(f"{check.status:<8} {check.name}: {check.detail}", flush=True)

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    report = run_selftest(args.gpu, methods, report=show)
    path = write_report(report, args.out)
    counts = {status: sum(c.status == status for c in report.checks) for status in ("ok", "failed", "skipped")}
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; report: {path}")
    return 1 if report.failed else 0
