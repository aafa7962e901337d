"""An export's files are checked against its manifest when a runner opens them: a damaged, truncated or
missing file (the ONNX or its external weights) is refused by name, and a verified export is not hashed again."""

import shutil

import pytest

from vgrt.engines import open_runner
from vgrt.errors import ArtifactError
from vgrt.export import exporter, verify
from vgrt.export.exporter import ExportSettings, export
from vgrt.export.feeds import example_feed
from vgrt.export.manifest import read_manifest


@pytest.fixture
def unet_copy(tmp_path, tiny_export):
    copy = tmp_path / "unet-export"
    shutil.copytree(tiny_export(features="none"), copy)
    return copy


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (flip_bytes, r"changed since it was exported \(damaged\): its sha256 is"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), r"has 1000 bytes, its manifest records \d+ \(truncated"),
        (lambda p: p.unlink(), "is missing from its export"),
    ],
    ids=["64-flipped-bytes", "truncated", "missing"],
)
def test_damaged_onnx_is_refused_by_name(unet_copy, damage, reason):
    onnx_file = unet_copy / "unet.onnx"
    damage(onnx_file)
    with pytest.raises(ArtifactError, match=reason) as caught:
        open_runner(unet_copy, "unet", "onnxruntime")
    assert repr(str(onnx_file)) in str(caught.value) and "export the directory again" in str(caught.value)


def test_external_weights_are_covered(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "PROTOBUF_LIMIT", 0)  # every model "too large": each tensor in a <sha256>.bin file
    directory = export(tmp_path / "aligner", ExportSettings(preset="tiny", components="aligner"))
    files = read_manifest(directory).component("aligner").files
    weights = sorted(name for name in files if name != "aligner.onnx")
    assert weights and all(name == f"{files[name]['sha256']}.bin" for name in weights)
    assert set(weights) == {p.name for p in directory.glob("*.bin")}
    assert files[weights[0]]["bytes"] == (directory / weights[0]).stat().st_size
    with open_runner(directory, "aligner") as runner:
        assert runner.infer(example_feed(directory, "aligner"))
    flip_bytes(directory / weights[0], count=8)
    with pytest.raises(ArtifactError, match=f"{weights[0]}' changed since it was exported"):
        open_runner(directory, "aligner")


def test_verified_files_are_only_stat_ed_on_later_opens(unet_copy, monkeypatch):
    hashed = []
    file_sha256 = verify.file_sha256
    monkeypatch.setattr(verify, "file_sha256", lambda path: hashed.append(path.name) or file_sha256(path))
    open_runner(unet_copy)  # a copy has new change times: hashed once, then remembered
    open_runner(unet_copy)
    assert hashed == ["unet.onnx"]
    (unet_copy / verify.RECORD).write_text("[not a record")  # the record is a memo: damaged, it is rebuilt
    open_runner(unet_copy)
    open_runner(unet_copy)
    assert hashed == ["unet.onnx", "unet.onnx"]


def test_fresh_export_is_opened_without_hashing(tmp_path, monkeypatch):
    directory = export(tmp_path / "aligner", ExportSettings(preset="tiny", components="aligner"))

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(verify, "file_sha256", no_hashing)
    open_runner(directory, "aligner")
