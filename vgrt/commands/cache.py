"""Show and free what the export cache holds: ls lists its entries and what engines compiled in them, du sums
them, prune removes entries, or only the compiled artifacts in them, unused for a time (vgrt.export.cache_entries)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("ls", help="list the entries, most recently used first, each with its compiled artifacts")
    du = actions.add_parser("du", help="the total size of the entries")
    prune = actions.add_parser(
        "prune", help="remove entries (unused for a time, beyond a size, or all), or only what engines compiled in them"
    )
    prune.add_argument(
        "--older-than",
        metavar="AGE",
        help="entries unused for longer than AGE (30d, 12h, 90m, 2w), and the compiled artifacts unused as long in "
        "the entries kept",
    )
    prune.add_argument("--max-size", metavar="SIZE", help="keep the most recently used entries up to SIZE (10G, 500M)")
    prune.add_argument("--all", action="store_true", help="every entry")
    prune.add_argument(
        "--compiled",
        action="store_true",
        help="remove only compiled artifacts (OpenVINO's compiled models, TensorRT engines), the exports stay; with "
        "--older-than AGE or --all",
    )
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
    from vgrt.export.cache_entries import human_bytes

    _print_total(root, entries)
    if not entries:
        return
    print(f"{'KEY':<16}  {'PRESET':<8}  {'DTYPE':<5}  {'SIZE':>10}  {'LAST USE':<16}  COMPONENTS")
    for e in entries:
        used = _when(e.last_use)
        print(f"{e.key:<16}  {e.preset:<8}  {e.dtype:<5}  {human_bytes(e.bytes):>10}  {used:<16}  {e.describe()}")
        for a in e.compiled:
            line = f"  {a.kind:<8}  {a.name:<30}  {human_bytes(a.bytes):>10}  {_when(a.last_use):<17} {_frees(a)}"
            print(line.rstrip())


def _when(last_use: float | None) -> str:
    import time

    return "interrupted prune" if last_use is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(last_use))


def _frees(artifact) -> str:
    """What removing it frees, when that is not all of its size: the rest is links to the export's files."""
    from vgrt.export.cache_entries import human_bytes

    if artifact.freed == artifact.bytes:
        return ""
    return f"frees {human_bytes(artifact.freed)} (the rest is hard links to the export's files)"


def _print_total(root, entries) -> None:
    from vgrt.export.cache_entries import human_bytes

    total = sum(e.bytes for e in entries)
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)}")


def _prune_criteria(args: argparse.Namespace) -> dict[str, object]:
    from vgrt.errors import InvalidInputError
    from vgrt.export.cache_entries import parse_age, parse_size

    if args.compiled and args.max_size:
        raise InvalidInputError(
            f"vgrt cache prune --compiled takes --older-than AGE or --all, not --max-size "
            f"{args.max_size!r}: compiled artifacts are pruned by their last use; to bound the cache's size, prune "
            f"whole entries with --max-size alone"
        )
    if args.compiled and not (args.all or args.older_than):
        raise InvalidInputError(
            "vgrt cache prune --compiled needs which compiled artifacts to remove: --older-than AGE "
            "or --all (add --dry-run to see what would go)"
        )
    if not (args.all or args.older_than or args.max_size):
        raise InvalidInputError(
            "vgrt cache prune needs what to remove: --older-than AGE, --max-size SIZE or --all (add --dry-run to see "
            "what would go)"
        )
    return {
        "everything": args.all,
        "older_than": parse_age(args.older_than) if args.older_than else None,
        "max_bytes": parse_size(args.max_size) if args.max_size else None,
        "compiled_only": args.compiled,
    }


def _prune(entries, criteria: dict[str, object], dry_run: bool) -> int:
    """Remove the chosen entries, then the chosen compiled artifacts in the entries kept (all the entries
    with --compiled): those unused for --older-than, or all of them with --compiled --all."""
    from vgrt.export.cache_entries import artifacts_to_prune, entries_to_prune

    compiled_only, older_than = criteria["compiled_only"], criteria["older_than"]
    chosen = (
        [] if compiled_only else entries_to_prune(entries, older_than, criteria["max_bytes"], criteria["everything"])
    )
    kept = [e for e in entries if e.path not in {c.path for c in chosen}]
    artifacts = artifacts_to_prune(kept, older_than, everything=compiled_only and criteria["everything"])
    prunes_compiled = compiled_only or older_than is not None
    # What else the engines' folders of the entries looked at hold is named as kept.
    left_alone = [path for e in kept for path in e.not_compiled] if prunes_compiled else []
    if dry_run:
        _print_dry_run(entries, chosen, artifacts if prunes_compiled else None, left_alone, compiled_only)
    else:
        _remove(chosen, artifacts, left_alone)
    return 0


def _print_dry_run(entries, chosen, artifacts, left_alone, compiled_only: bool) -> None:
    """What a prune would do; `artifacts` None when it would look at no compiled artifact (--max-size, --all)."""
    from vgrt.export.cache_entries import NOT_COMPILED, human_bytes

    for entry in chosen:
        print(f"would remove {entry.path} ({human_bytes(entry.bytes)}, {entry.describe()})")
    for a in artifacts or ():
        print(f"would remove {a.path} ({a.kind}, last use {_when(a.last_use)}, frees {human_bytes(a.freed)})")
    for path in left_alone:
        print(f"would keep {path}: {NOT_COMPILED}")
    freed = human_bytes(sum(e.bytes for e in chosen) + sum(a.freed for a in artifacts or ()))
    of_entries = _count(len(entries), "entry", "entries")
    compiled = _count(len(artifacts or ()), "compiled artifact", "compiled artifacts")
    if compiled_only:
        print(f"would free {freed} in {compiled} of {of_entries} (their exports stay)")
    else:
        print(
            f"would free {freed} in {len(chosen)} of {of_entries}"
            + (f" and {compiled}" if artifacts is not None else "")
        )


def _report(done, freed_by, describe) -> tuple[int, int]:
    """Print each (item, None: removed | why it was kept) of a prune; (bytes freed, items kept)."""
    from vgrt.export.cache_entries import human_bytes

    freed, kept = 0, 0
    for item, reason in done:
        if reason is None:
            freed += freed_by(item)
            print(f"removed {item.path} ({describe(item, human_bytes(freed_by(item)))})")
        else:
            kept += 1
            print(f"kept {item.path}: {reason}")
    return freed, kept


def _remove(chosen, artifacts, left_alone) -> None:
    from vgrt.export.cache_entries import NOT_COMPILED, human_bytes, prune, prune_compiled

    entries_freed, kept_entries = _report(prune(chosen), lambda e: e.bytes, lambda e, size: size)
    artifacts_freed, kept_artifacts = _report(
        prune_compiled(artifacts), lambda a: a.freed, lambda a, size: f"{a.kind}, freed {size}"
    )
    freed = entries_freed + artifacts_freed
    for path in left_alone:
        print(f"kept {path}: {NOT_COMPILED}")
    counts = (
        (kept_entries, "entry", "entries"),
        (kept_artifacts, "compiled artifact", "compiled artifacts"),
        (len(left_alone), "other file or folder", "other files or folders"),
    )
    kept = [_count(*count) for count in counts if count[0]]
    print(f"freed {human_bytes(freed)}" + (f"; kept {', '.join(kept)} (see above)" if kept else ""))


def _count(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
