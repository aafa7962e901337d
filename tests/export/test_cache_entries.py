"""`vgrt cache ls|du|prune` lists the cache's entries, sums them and removes them by age, size or all,
never removing what vgrt did not write nor an entry being exported now."""

import os
import time

import pytest

from tests.engines.test_engine_set import manifest_only
from vgrt.cli import main
from vgrt.export import cache
from vgrt.export.cache_entries import entries_to_prune, folder_bytes, list_entries, parse_age, parse_size
from vgrt.export.staging import target_lock

DAY = 86400


def entry(root, key, days_unused, size):
    """A cache entry unused for `days_unused` days holding a `size`-byte engine beside its export."""
    folder = root / f"tiny-{key * 16}"
    folder.mkdir(parents=True)
    manifest_only(folder, "fp16")
    (folder / "tensorrt").mkdir()
    (folder / "tensorrt" / "unet-0.plan").write_bytes(b"e" * size)  # written beside the export by vgrt
    used = time.time() - days_unused * DAY
    os.utime(folder, (used, used))
    return folder


@pytest.fixture
def root(tmp_path):
    entry(tmp_path, "a", 1, 100_000)
    entry(tmp_path, "b", 10, 200_000)
    entry(tmp_path, "c", 40, 300_000)
    (tmp_path / "my-notes").mkdir()  # not vgrt's: never listed, never removed
    (tmp_path / "my-notes" / "keep.txt").write_text("mine")
    return tmp_path


def test_ls_lists_entries_most_recently_used_first(root, capsys):
    assert main(["cache", "ls", "--cache", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{root}: 3 entries, ")
    assert lines[1].split() == ["KEY", "PRESET", "DTYPE", "SIZE", "LAST", "USE", "COMPONENTS"]
    assert [line.split()[0] for line in lines[2:]] == ["a" * 16, "b" * 16, "c" * 16]
    assert lines[2].split()[1:3] == ["tiny", "fp16"] and lines[2].endswith("unet (none)")


def test_du_sums_every_file_vgrt_wrote_in_the_entries(root, capsys):
    entries = list_entries(root)
    assert main(["cache", "du", "--cache", str(root)]) == 0
    assert sum(e.bytes for e in entries) == sum(folder_bytes(e.path) for e in entries) > 600_000
    assert capsys.readouterr().out.strip().endswith("3 entries, " + f"{sum(e.bytes for e in entries) / 1024:.1f} KiB")


def test_hard_links_are_counted_once(tmp_path):
    (tmp_path / "blob").write_bytes(b"x" * 5000)
    os.link(tmp_path / "blob", tmp_path / "link")
    assert folder_bytes(tmp_path) == 5000


def test_dry_run_names_what_would_go_and_removes_nothing(root, capsys):
    assert main(["cache", "prune", "--older-than", "30d", "--dry-run", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"would remove {root / ('tiny-' + 'c' * 16)}" in out and "in 1 of 3 entries" in out
    assert len(list_entries(root)) == 3


@pytest.mark.parametrize(
    "options, left",
    [(["--older-than", "5d"], ["a"]), (["--max-size", "350K"], ["a", "b"]), (["--all"], [])],
    ids=["by-age", "by-size", "all"],
)
def test_prune_removes_the_chosen_entries_and_nothing_else(root, options, left):
    assert main(["cache", "prune", *options, "--cache", str(root)]) == 0
    assert [e.key[0] for e in list_entries(root)] == left
    assert (root / "my-notes" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("tiny-")) == ["my-notes"], "no leftovers"


def test_prune_keeps_entries_holding_foreign_files_or_being_exported(root, capsys):
    foreign = root / f"tiny-{'b' * 16}" / "my-lora.safetensors"
    foreign.write_bytes(b"a user's file")
    with target_lock(root / f"tiny-{'c' * 16}"):  # another process is exporting this entry
        assert main(["cache", "prune", "--all", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert "holds files vgrt did not write (my-lora.safetensors)" in out and "another process is exporting it" in out
    assert [e.key[0] for e in list_entries(root)] == ["b", "c"] and foreign.is_file()


def test_size_criterion_keeps_the_most_recent_entries():
    entries = [type("E", (), {"last_use": t, "bytes": b})() for t, b in ((3, 10), (2, 10), (1, 10))]
    assert [e.last_use for e in entries_to_prune(entries, max_bytes=25, now=4)] == [1]
    assert [e.last_use for e in entries_to_prune(entries, older_than=1.5, now=4)] == [2, 1]


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "needs what to remove: --older-than AGE, --max-size SIZE or --all"),
        (["--older-than", "soon"], "--older-than 'soon' is not an age"),
        (["--max-size", "big"], "--max-size 'big' is not a size"),
    ],
)
def test_prune_without_a_valid_criterion_is_refused(root, capsys, options, message):
    assert main(["cache", "prune", *options, "--cache", str(root)]) == 2
    assert message in capsys.readouterr().err and len(list_entries(root)) == 3


def test_sizes_and_ages_parse():
    assert (parse_size("10G"), parse_size("500m"), parse_size("1.5KiB"), parse_size("42")) == (
        10 << 30,
        500 << 20,
        1536,
        42,
    )
    assert (parse_age("30d"), parse_age("12h"), parse_age("2w")) == (30 * DAY, 12 * 3600, 14 * DAY)


def test_each_reuse_renews_the_last_use(tmp_path, monkeypatch):
    folder = entry(tmp_path, "d", 20, 10)
    monkeypatch.setattr(cache, "_entry_problem", lambda directory: None)
    monkeypatch.setattr(cache, "cache_key", lambda settings: "d" * 16)
    assert cache.cached_export(cache.ExportSettings(preset="tiny"), tmp_path) == folder
    assert time.time() - folder.stat().st_mtime < 60
