"""`vgrt` command line: a thin layer over the Python API, one module per subcommand.

Subcommand modules import their heavy dependencies only when run, so `vgrt --help` stays fast and a
broken optional dependency breaks only the subcommand that needs it.
"""

import argparse
import importlib
import logging
import sys
import warnings

from vgrt._lazy import missing_dependency
from vgrt.errors import VgrtError

log = logging.getLogger("vgrt")

# name -> module in vgrt.commands with `add_arguments(parser)`, `run(args) -> int` and a docstring.
SUBCOMMANDS = {
    "export": "vgrt.commands.export",
    "compose": "vgrt.commands.compose",
    "examples": "vgrt.commands.examples",
    "build": "vgrt.commands.build",
    "bench": "vgrt.commands.bench",
    "compare": "vgrt.commands.compare",
    "calibrate": "vgrt.commands.calibrate",
    "doctor": "vgrt.commands.doctor",
    "cache": "vgrt.commands.cache",
    "serve": "vgrt.commands.serve",
    "request": "vgrt.commands.request",
    "selftest": "vgrt.commands.selftest",
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
    if args.verbose:  # -v shows everything, library warnings Python hides by default included
        warnings.simplefilter("default")
    try:
        return args.run(args)
    except VgrtError as err:
        return _fail(args, err, str(err), 2)
    except ModuleNotFoundError as err:  # an optional package that a lazy import needed
        missing = missing_dependency(err)
        return _fail(args, err, str(missing), 2) if missing else _internal_error(args, err)
    except KeyboardInterrupt:
        print(f"vgrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the traceback is logged at DEBUG (-v)
        return _internal_error(args, err)


def _fail(args: argparse.Namespace, err: Exception, message: str, code: int) -> int:
    log.debug("traceback of the error below:", exc_info=err)  # shown with -v
    print(f"vgrt {args.command}: error: {message}", file=sys.stderr)
    return code


def _internal_error(args: argparse.Namespace, err: Exception) -> int:
    """A bug or an unforeseen failure: one line by default, the traceback too with -v."""
    log.debug("traceback of the internal error below:", exc_info=err)
    first_line = next(iter(str(err).splitlines()), "")  # library messages can run to pages
    hint = "" if args.verbose else "; rerun with -v for the traceback"
    print(f"vgrt {args.command}: internal error: {type(err).__name__}: {first_line}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
