"""Report which backends, versions and GPU features this machine has, and why a missing one is missing."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from vgrt.doctor import collect

    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(map(len, report))
    for name, entry in report.items():
        state = "ok " if entry["ok"] else "-- "
        print(f"{state}{name:<{width}}  {entry['detail']}")
    return 0
