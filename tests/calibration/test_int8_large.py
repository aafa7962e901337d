"""INT8 from a large export as the cache keeps it: weights in content-named files hard-linked among entries
(the onnx package refuses hard-linked external data) and a model above protobuf's 2 GB (the quantised graph
must keep its weights in files too). The tiny UNet stands in for SD 1.5, saved as a large model is."""

import os

import numpy as np
import pytest

from vgrt.export import cache, exporter
from vgrt.export.exporter import ExportSettings


@pytest.fixture(scope="module")
def large_shared_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("large-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "PROTOBUF_LIMIT", 0)  # every model "too large": weights in content-named files
        yield cache.cached_export(ExportSettings(preset="tiny"), root)


@pytest.mark.parametrize("int8_attention", [False, True])
def test_int8_is_calibrated_from_a_shared_large_export(large_shared_export, synthetic_set, tmp_path, int8_attention):
    from vgrt.calibration.int8 import Int8Settings, quantize_export
    from vgrt.engines import open_runner
    from vgrt.export import example_feed
    from vgrt.export.blobs import external_files
    from vgrt.export.manifest import read_manifest

    export = large_shared_export
    weights = [export / name for name in external_files(export / "unet.onnx")]
    assert weights and all(path.stat().st_nlink > 1 for path in weights)  # linked with the cache's store
    _, calibration = synthetic_set
    settings = Int8Settings(sqnr_threshold_db=30.0, int8_attention=int8_attention)
    out, report = quantize_export(export, calibration, tmp_path / "int8", settings)

    manifest = read_manifest(out)
    listed = set(manifest.data["components"]["unet"]["files"])
    assert listed == {"unet.onnx", *external_files(out / "unet.onnx")} and len(listed) > 1  # weights in a file
    assert set(os.listdir(out)) >= listed and not list(tmp_path.glob(".vgrt-private-*"))  # the copy is gone
    assert report.layer_sqnr_db and report.relative_error < 0.5
    assert bool(report.attention_ranges) == int8_attention  # the attention pass reads and writes the large form
    feed = example_feed(export, seed=3)
    with open_runner(export, backend="onnxruntime") as fp32, open_runner(out, backend="onnxruntime") as int8:
        expected, got = fp32.infer(feed)["noise_pred"].numpy(), int8.infer(feed)["noise_pred"].numpy()
    assert 0 < np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.5
