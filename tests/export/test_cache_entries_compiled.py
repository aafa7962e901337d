"""`vgrt cache ls` lists what engines compiled in each entry, and `vgrt cache prune` removes what is unused
for a time (or all of it with --compiled --all) while the exports stay: only the names vgrt gives compiled
artifacts, the freed size counting only the files no export links, the entry's last use unchanged."""

import os
import time

import pytest

from tests.engines.test_engine_set import manifest_only
from tests.engines.test_tensorrt_cache import KEY
from vgrt.cli import main
from vgrt.engines.tensorrt.cache import EngineCache
from vgrt.export.cache_entries import compiled_artifacts, human_bytes, list_entries
from vgrt.export.staging import target_lock

DAY = 86400
OLD, RECENT = "0123456789abcdef", "fedcba9876543210"
WEIGHTS, GRAPH, BLOB, ENGINE, RECORD = 50_000, 1_000, 300_000, 100_000, b'{"version": 1}'


def age(path, days):
    used = time.time() - days * DAY
    os.utime(path, (used, used))


def fake_entry(root, key="a", days_unused=2):
    """An entry (its export: a graph and a weight file) whose OpenVINO folders link the export's files beside
    a compiled blob each, one unused for 40 days and one for 1 day; a TensorRT engine unused for 45 days; and
    what vgrt does not name as a compiled artifact: a folder in openvino/ and a timing cache in tensorrt/."""
    entry = root / f"tiny-{key * 16}"
    entry.mkdir(parents=True)
    manifest_only(entry, "fp32")
    (entry / "unet.onnx").write_bytes(b"g" * GRAPH)
    (entry / "unet.onnx.data").write_bytes(b"w" * WEIGHTS)
    for name, days in ((OLD, 40), (RECENT, 1)):
        folder = entry / "openvino" / f"unet-{name}"
        (folder / "compiled").mkdir(parents=True)
        for file in ("unet.onnx", "unet.onnx.data"):
            os.link(entry / file, folder / file)
        (folder / "compiled" / f"{name}.blob").write_bytes(b"b" * BLOB)
        age(folder, days)
    (entry / "openvino" / "my-notes").mkdir()
    age(entry / "openvino" / "my-notes", 40)
    (entry / "tensorrt").mkdir()
    (entry / "tensorrt" / f"unet-{OLD}.plan").write_bytes(b"e" * ENGINE)
    (entry / "tensorrt" / f"unet-{OLD}.json").write_bytes(RECORD)
    (entry / "tensorrt" / "timing-nvidia-h100-sm90-trt11.1.0.cache").write_bytes(b"t" * 10)
    for path in (
        entry / "tensorrt" / f"unet-{OLD}.plan",
        entry / "tensorrt" / "timing-nvidia-h100-sm90-trt11.1.0.cache",
    ):
        age(path, 45)
    age(entry, days_unused)
    return entry


def export_files(entry):
    return {name: (entry / name).read_bytes() for name in ("unet.onnx", "unet.onnx.data", "manifest.json")}


def prune(root, *options):
    return main(["cache", "prune", *options, "--cache", str(root)])


@pytest.fixture
def entry(tmp_path):
    return fake_entry(tmp_path)


def test_compiled_artifacts_are_found_with_what_removing_them_frees(entry):
    found, others = compiled_artifacts(entry)
    assert [(a.kind, a.name) for a in found] == [
        ("openvino", f"unet-{RECENT}"), ("openvino", f"unet-{OLD}"), ("tensorrt", f"unet-{OLD}")
    ]  # fmt: skip
    old_folder, engine = found[1], found[2]
    assert old_folder.bytes == BLOB + WEIGHTS + GRAPH and old_folder.freed == BLOB  # the links stay with the export
    assert engine.bytes == engine.freed == ENGINE + len(RECORD)
    assert engine.paths == (entry / "tensorrt" / f"unet-{OLD}.json", entry / "tensorrt" / f"unet-{OLD}.plan")
    assert [p.name for p in others] == ["my-notes", "timing-nvidia-h100-sm90-trt11.1.0.cache"]


def test_ls_lists_each_entrys_compiled_artifacts(entry, capsys):
    assert main(["cache", "ls", "--cache", str(entry.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[0] == "a" * 16
    listed = [line.split(maxsplit=2) for line in lines[3:]]
    assert [(kind, name) for kind, name, _ in listed] == [
        ("openvino", f"unet-{RECENT}"), ("openvino", f"unet-{OLD}"), ("tensorrt", f"unet-{OLD}")
    ]  # fmt: skip
    old_line = lines[4]
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime((entry / "openvino" / f"unet-{OLD}").stat().st_mtime))
    assert human_bytes(BLOB + WEIGHTS + GRAPH) in old_line and used in old_line
    assert f"frees {human_bytes(BLOB)} (the rest is hard links to the export's files)" in old_line
    assert "frees" not in lines[5]  # the engine holds no link: its size is what removing it frees


def test_prune_compiled_older_than_removes_only_stale_compiled_artifacts(entry, capsys):
    files, entry_mtime = export_files(entry), entry.stat().st_mtime_ns
    assert prune(entry.parent, "--compiled", "--older-than", "30d") == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (entry / "openvino").iterdir()) == ["my-notes", f"unet-{RECENT}"], "nothing aside"
    assert sorted(p.name for p in (entry / "tensorrt").iterdir()) == ["timing-nvidia-h100-sm90-trt11.1.0.cache"]
    assert export_files(entry) == files and entry.stat().st_mtime_ns == entry_mtime  # the export and its last use
    assert (entry / "unet.onnx.data").stat().st_nlink == 2  # the recent folder's link is still there
    assert f"removed {entry / 'openvino' / f'unet-{OLD}'} (openvino, freed {human_bytes(BLOB)})" in out
    assert f"kept {entry / 'openvino' / 'my-notes'}: left alone: not named as vgrt names compiled artifacts" in out
    freed = human_bytes(BLOB + ENGINE + len(RECORD))  # the linked weights and graph freed nothing
    assert out.splitlines()[-1] == f"freed {freed}; kept 2 other files or folders (see above)"
    assert [e.key for e in list_entries(entry.parent)] == ["a" * 16]


def test_dry_run_names_what_would_go_and_removes_nothing(entry, capsys):
    before = sorted(str(p) for p in entry.rglob("*"))
    assert prune(entry.parent, "--compiled", "--older-than", "30d", "--dry-run") == 0
    out = capsys.readouterr().out
    assert sorted(str(p) for p in entry.rglob("*")) == before
    assert f"would remove {entry / 'tensorrt' / f'unet-{OLD}.plan'} (tensorrt, last use " in out
    assert f"would keep {entry / 'openvino' / 'my-notes'}: " in out
    freed = human_bytes(BLOB + ENGINE + len(RECORD))
    assert out.splitlines()[-1] == f"would free {freed} in 2 compiled artifacts of 1 entry (their exports stay)"


def test_compiled_all_removes_every_compiled_artifact_and_keeps_the_exports(entry):
    files = export_files(entry)
    assert prune(entry.parent, "--compiled", "--all") == 0
    assert sorted(p.name for p in (entry / "openvino").iterdir()) == ["my-notes"]
    assert export_files(entry) == files and (entry / "unet.onnx.data").stat().st_nlink == 1


def test_older_than_prunes_stale_entries_and_stale_compiled_artifacts_in_the_others(tmp_path, capsys):
    kept, stale = fake_entry(tmp_path, "a", days_unused=2), fake_entry(tmp_path, "b", days_unused=40)
    assert prune(tmp_path, "--older-than", "30d", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("in 1 of 2 entries and 2 compiled artifacts")
    assert prune(tmp_path, "--older-than", "30d") == 0
    assert not stale.exists() and [e.key for e in list_entries(tmp_path)] == ["a" * 16]
    assert [a.name for a in compiled_artifacts(kept)[0]] == [f"unet-{RECENT}"]


def test_max_size_alone_leaves_compiled_artifacts(entry):
    assert prune(entry.parent, "--max-size", "10G") == 0
    assert len(compiled_artifacts(entry)[0]) == 3


def test_a_folder_an_interrupted_prune_moved_aside_goes_with_the_next_prune(entry, capsys):
    aside = entry / "openvino" / f".unet-{RECENT}.old-0a1b2c3d"
    aside.mkdir()
    (entry / "openvino" / f"unet-{RECENT}").rename(aside / f"unet-{RECENT}")  # as staging.discard_directory does
    assert main(["cache", "ls", "--cache", str(entry.parent)]) == 0
    listed = capsys.readouterr().out.splitlines()[-1]  # listed last, with no last use
    assert listed.split()[:2] == ["openvino", aside.name] and "interrupted prune" in listed
    assert prune(entry.parent, "--compiled", "--older-than", "30d") == 0  # it was used 1 day ago, but it is aside
    assert sorted(p.name for p in (entry / "openvino").iterdir()) == ["my-notes"]


def test_an_entry_being_exported_keeps_its_compiled_artifacts(entry, capsys):
    with target_lock(entry):
        assert prune(entry.parent, "--compiled", "--all") == 0
    out = capsys.readouterr().out
    assert "another process is exporting its entry now" in out and "kept 3 compiled artifacts" in out
    assert len(compiled_artifacts(entry)[0]) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        (["--compiled", "--max-size", "10G"], "--compiled takes --older-than AGE or --all, not --max-size '10G'"),
        (["--compiled"], "--compiled needs which compiled artifacts to remove: --older-than AGE or --all"),
    ],
)
def test_compiled_without_a_criterion_it_takes_is_refused(entry, capsys, options, message):
    before = sorted(str(p) for p in entry.rglob("*"))
    assert prune(entry.parent, *options) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(str(p) for p in entry.rglob("*")) == before


def test_a_tensorrt_load_renews_the_engines_last_use(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, b"serialized engine")
    age(path, 40)
    assert cache.load(KEY) == b"serialized engine"
    assert time.time() - path.stat().st_mtime < 60
