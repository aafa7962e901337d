"""Write small example images and masks (drawn by vgrt, nothing downloaded) for trying the methods."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the example files")
    parser.add_argument("--size", type=int, default=64, help="side of the square images in pixels (default: 64)")
    parser.add_argument(
        "--preset", default="tiny", help="the preset they are for: its sizes are allowed (default: tiny)"
    )


def run(args: argparse.Namespace) -> int:
    from vgrt.checks import check_writable_folder
    from vgrt.runtime.examples import write_examples

    check_writable_folder(args.out, "--out")
    for path in write_examples(args.out, args.size, args.preset):
        print(f"wrote {path}")
    return 0
