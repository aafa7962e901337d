"""The OpenVINO runner's cache folder: static and dynamic models of one export share it (OpenVINO names
each blob by the model it compiles, shapes included), and each activation renews its last use, by which
`vgrt cache prune` frees it."""

import os
import time

import pytest

from tests.export.test_unet_parity import relative_error
from tests.exports import copy_export
from vgrt._lazy import is_available
from vgrt.engines import open_runner
from vgrt.export import example_feed
from vgrt.export.cache_entries import compiled_artifacts

pytestmark = pytest.mark.skipif(
    not is_available("openvino"), reason="openvino is not installed: pip install 'vgrt[cpu]'"
)


def test_static_and_dynamic_models_share_one_folder_and_both_match_torch(tiny_export, tmp_path):
    directory = tiny_export(features="none")  # the export the next test reads
    feed = example_feed(directory, seed=707)
    with open_runner(directory, backend="torch") as reference:
        expected = reference.infer(feed)["noise_pred"]
    folders = set()
    for static in (True, False, True, False):  # compiled, then read back from the shared folder
        with open_runner(directory, backend="openvino", static_shapes=static, cache_dir=tmp_path) as runner:
            got = runner.infer(feed)["noise_pred"]
            folders.add(runner.folder)
            loaded = runner.compiled.get_property("LOADED_FROM_CACHE")
        assert relative_error(got, expected) <= 1e-4, f"static_shapes={static}"
    assert loaded and len(folders) == 1 and list(tmp_path.iterdir()) == list(folders)
    assert len(list((folders.pop() / "compiled").glob("*.blob"))) == 2  # the static model's and the dynamic one's


def test_each_activation_renews_the_folders_last_use(tiny_export, tmp_path):
    entry = copy_export(tiny_export(features="none"), tmp_path / f"tiny-{'e' * 16}")
    with open_runner(entry, backend="openvino") as runner:  # the default cache: inside the export
        folder = runner.folder
    unused = time.time() - 40 * 86400
    os.utime(folder, (unused, unused))
    with open_runner(entry, backend="openvino"):
        pass
    assert time.time() - folder.stat().st_mtime < 60
    (artifact,), others = compiled_artifacts(entry)  # the name vgrt cache prune looks for
    assert (artifact.kind, artifact.path, others) == ("openvino", folder, ())
    assert artifact.freed < artifact.bytes  # the prepared model is the export's own file, linked
