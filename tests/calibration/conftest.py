"""A calibration set of the tiny plain UNet, made once per session from seeded random feeds (fast, no
method run); the capture tests make their own sets from real runs."""

import pytest


@pytest.fixture(scope="session")
def synthetic_set(tiny_export, tmp_path_factory):
    """(fp32 export directory, calibration set directory) with 8 feeds of the tiny plain UNet."""
    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest
    from vgrt.models.source import ModelSource

    export = tiny_export()
    spec = read_manifest(export).component("unet").spec
    feeds = [random_feed(spec, {"batch": 2, "height": 16, "width": 16, "context": 77}, seed=i) for i in range(8)]
    inputs = {
        name: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for name, v in feeds[0].items()
    }
    directory = tmp_path_factory.mktemp("calibration") / "set"
    with open_for_capture(directory, model_identity(ModelSource("tiny"))) as writer:
        run = CapturedRun("random-0", "random", 0, 8, (128, 128), "none", inputs, 8, 8, "", 0, "")
        writer.add_run(run, feeds)
    return export, directory


@pytest.fixture(scope="session")
def int8_export(synthetic_set, tmp_path_factory):
    """(fp32 export, INT8 export, its QuantisationReport): the synthetic set quantised with the default settings."""
    from vgrt.calibration.int8 import Int8Settings, quantize_export

    export, calibration = synthetic_set
    out, report = quantize_export(export, calibration, tmp_path_factory.mktemp("int8") / "unet-int8", Int8Settings())
    return export, out, report
