"""`vgrt` command line: a thin layer over the Python API, one module per subcommand.

Subcommand modules import their heavy dependencies only when run, so `vgrt --help` stays fast and a
broken optional dependency breaks only the subcommand that needs it.
"""

import argparse
import importlib
import logging
import sys

from vgrt.errors import VgrtError

# name -> module in vgrt.commands with `add_arguments(parser)`, `run(args) -> int` and a docstring.
SUBCOMMANDS = {
    "export": "vgrt.commands.export",
    "compose": "vgrt.commands.compose",
    "examples": "vgrt.commands.examples",
    "build": "vgrt.commands.build",
    "bench": "vgrt.commands.bench",
    "compare": "vgrt.commands.compare",
    "doctor": "vgrt.commands.doctor",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgrt", description="deployment runtime for image-guided Stable Diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("vgrt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.run(args)
    except VgrtError as err:
        print(f"vgrt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
