"""Show and free what the export cache holds: ls lists its entries, du sums them, prune removes them."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("ls", help="list the entries, most recently used first")
    du = actions.add_parser("du", help="the total size of the entries")
    prune = actions.add_parser("prune", help="remove entries: unused for a time, beyond a size, or all")
    prune.add_argument("--older-than", metavar="AGE", help="entries unused for longer than AGE (30d, 12h, 90m, 2w)")
    prune.add_argument("--max-size", metavar="SIZE", help="keep the most recently used entries up to SIZE (10G, 500M)")
    prune.add_argument("--all", action="store_true", help="every entry")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    for command in (ls, du, prune):
        command.add_argument("--cache", help="the cache folder (default: $VGRT_CACHE, else ~/.cache/vgrt)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vgrt.export.cache import cache_root
    from vgrt.export.cache_entries import list_entries

    root = Path(args.cache) if args.cache else cache_root()
    criteria = _prune_criteria(args) if args.action == "prune" else None  # refused before the cache is read
    entries = list_entries(root)
    if args.action == "ls":
        _print_listing(root, entries)
    elif args.action == "du":
        _print_total(root, entries)
    else:
        return _prune(entries, criteria, args.dry_run)
    return 0


def _print_listing(root, entries) -> None:
    import time

    from vgrt.export.cache_entries import human_bytes

    _print_total(root, entries)
    if not entries:
        return
    print(f"{'KEY':<16}  {'PRESET':<8}  {'DTYPE':<5}  {'SIZE':>10}  {'LAST USE':<16}  COMPONENTS")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use))
        print(f"{e.key:<16}  {e.preset:<8}  {e.dtype:<5}  {human_bytes(e.bytes):>10}  {used:<16}  {e.describe()}")


def _print_total(root, entries) -> None:
    from vgrt.export.cache_entries import human_bytes

    total = sum(e.bytes for e in entries)
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)}")


def _prune_criteria(args: argparse.Namespace) -> dict[str, object]:
    from vgrt.errors import InvalidInputError
    from vgrt.export.cache_entries import parse_age, parse_size

    if not (args.all or args.older_than or args.max_size):
        raise InvalidInputError(
            "vgrt cache prune needs what to remove: --older-than AGE, --max-size SIZE or --all (add --dry-run to see "
            "what would go)"
        )
    return {
        "everything": args.all,
        "older_than": parse_age(args.older_than) if args.older_than else None,
        "max_bytes": parse_size(args.max_size) if args.max_size else None,
    }


def _prune(entries, criteria: dict[str, object], dry_run: bool) -> int:
    from vgrt.export.cache_entries import entries_to_prune, human_bytes, prune

    chosen = entries_to_prune(entries, **criteria)
    if dry_run:
        for entry in chosen:
            print(f"would remove {entry.path} ({human_bytes(entry.bytes)}, {entry.describe()})")
        print(f"would free {human_bytes(sum(e.bytes for e in chosen))} in {len(chosen)} of {len(entries)} entries")
        return 0
    freed, kept = 0, 0
    for entry, reason in prune(chosen):
        if reason is None:
            freed += entry.bytes
            print(f"removed {entry.path} ({human_bytes(entry.bytes)})")
        else:
            kept += 1
            print(f"kept {entry.path}: {reason}")
    print(
        f"freed {human_bytes(freed)}" + (f"; kept {kept} entr{'y' if kept == 1 else 'ies'} (see above)" if kept else "")
    )
    return 0
