"""Fault tests: exports killed with SIGKILL at several points leave nothing that is trusted, keep the
export they were replacing, and the next run removes what they left; two processes that need the same
cache entry export it once.

Each child process runs a real tiny export and pauses at one point (functions monkeypatched inside the
child); the test kills it there.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vgrt.errors import ArtifactError
from vgrt.export.cache import cache_key, cached_export
from vgrt.export.exporter import ExportSettings, export
from vgrt.export.manifest import read_manifest
from vgrt.export.staging import clean_interrupted, target_lock

NEW = ExportSettings(preset="tiny", components="aligner")
OLD = ExportSettings(preset="tiny", components="aligner", seed=1)

CHILD = """
import pathlib, sys, time
from vgrt.export import cache, exporter, staging
from vgrt.export.exporter import ExportSettings

point, target, marker = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])

def pause(*args):
    marker.touch()
    time.sleep(600)

def half_saved(model, path, save=exporter._save):
    save(model, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pause()

def retired_then_paused(target, retire=staging._retire):
    retire(target)
    pause()

if point in ("writing", "cache"):
    exporter._save = half_saved
elif point == "before-swap":
    staging._swap_in = pause
elif point == "mid-swap":
    staging._retire = retired_then_paused
settings = ExportSettings(preset="tiny", components="aligner")
if point == "cache":
    cache.cached_export(settings, target)
else:
    exporter.export(target, settings)
"""

CONCURRENT = """
import os, pathlib, sys, time
from vgrt.export import cache
from vgrt.export.exporter import ExportSettings

root, count, ready, peer = map(pathlib.Path, sys.argv[1:5])

def counted(directory, settings, write_export=cache.write_export):
    with count.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    return write_export(directory, settings)

cache.write_export = counted
ready.touch()
while not peer.exists():  # start together, so that one waits on the other's lock
    time.sleep(0.01)
print(cache.cached_export(ExportSettings(preset="tiny", components="aligner"), root))
"""


def child(script: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the child exited with {process.returncode} before pausing"
        assert time.monotonic() < deadline, "the child did not reach its pause"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """For each kill point, the folder of a child killed there: its `out` held an older export (made with
    seed 1) that the child was replacing; for "cache", the cache root of a first-use export."""
    old = export(tmp_path_factory.mktemp("old") / "out", OLD)
    folders, children = {}, {}
    for point in ("writing", "before-swap", "mid-swap", "cache"):
        folder = folders[point] = tmp_path_factory.mktemp(point)
        if point != "cache":
            shutil.copytree(old, folder / "out")
        target = folder if point == "cache" else folder / "out"
        children[point] = child(CHILD, point, target, folder.parent / f"{point}.paused")
    for point, process in children.items():
        wait_for(folders[point].parent / f"{point}.paused", process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return folders, read_manifest(old).data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("point", ["writing", "before-swap"])
def test_killed_before_the_swap_keeps_the_old_export_and_the_next_run_cleans_up(killed, point):
    folders, old_manifest = killed
    folder = folders[point]
    assert leftovers(folder) == [p for p in leftovers(folder) if p.startswith(".out.tmp-")] != []
    manifest = read_manifest(folder / "out")
    assert manifest.data == old_manifest
    manifest.path(manifest.component("aligner"))  # the old files verify: nothing half-written is in place
    export(folder / "out", NEW)
    assert leftovers(folder) == [] and sorted(p.name for p in folder.iterdir()) == ["out"]
    assert read_manifest(folder / "out").data["source"]["seed"] == 0


def test_killed_mid_swap_is_not_trusted_and_the_old_export_comes_back(killed):
    folders, old_manifest = killed
    folder = folders["mid-swap"]
    with pytest.raises(ArtifactError, match="not a complete vgrt export"):
        read_manifest(folder / "out")  # the old export was moved aside and the new one not yet in place
    with target_lock(folder / "out"):
        clean_interrupted(folder / "out")
    assert leftovers(folder) == [] and read_manifest(folder / "out").data == old_manifest


def test_killed_first_use_export_is_not_in_the_cache_and_the_next_use_exports_it(killed):
    folders, _ = killed
    root = folders["cache"]
    entry = root / f"tiny-{cache_key(NEW)}"
    assert not entry.exists() and leftovers(root) != []
    assert cached_export(NEW, root) == entry
    assert sorted(p.name for p in root.iterdir()) == [entry.name]  # staging and lock file gone
    manifest = read_manifest(entry)
    manifest.path(manifest.component("aligner"))


def test_two_processes_needing_one_cache_entry_export_it_once(tmp_path):
    root, count = tmp_path / "cache", tmp_path / "exports.txt"
    ready = [tmp_path / "a.ready", tmp_path / "b.ready"]
    processes = [child(CONCURRENT, root, count, ready[i], ready[1 - i]) for i in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert len(count.read_text().splitlines()) == 1
    entry = root / f"tiny-{cache_key(NEW)}"
    assert [out.strip().splitlines()[-1] for out in outputs] == [str(entry)] * 2
    assert sorted(p.name for p in root.iterdir()) == [entry.name]
