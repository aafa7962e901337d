"""Calibration sets of tiny UNets, made once per session from seeded random feeds (fast, no method run);
the capture tests make their own sets from real runs."""

import pytest

SIZES = {"batch": 2, "height": 16, "width": 16, "context": 77}


def write_synthetic_set(export, directory, method: str, features: str, samples: int = 8):
    """A calibration set at `directory` of `samples` seeded random feeds of `export`'s UNet, recorded as one
    run of `method` with UNet `features`."""
    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.export.feeds import random_feed
    from vgrt.export.manifest import read_manifest
    from vgrt.models.source import ModelSource

    spec = read_manifest(export).component("unet").spec
    feeds = [random_feed(spec, {**spec.profile_sizes("opt"), **SIZES}, seed=i) for i in range(samples)]
    inputs = {
        name: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for name, v in feeds[0].items()
    }
    with open_for_capture(directory, model_identity(ModelSource("tiny"))) as writer:
        run = CapturedRun(f"{method}-0", method, 0, samples, (128, 128), features, inputs, samples, samples, "", 0, "")
        writer.add_run(run, feeds)
    return directory


@pytest.fixture(scope="session")
def synthetic_set(tiny_export, tmp_path_factory):
    """(fp32 export directory, calibration set directory) with 8 feeds of the tiny plain UNet."""
    export = tiny_export()
    return export, write_synthetic_set(export, tmp_path_factory.mktemp("calibration") / "set", "random", "none")


@pytest.fixture(scope="session")
def masked_set(tiny_export, tmp_path_factory):
    """(fp32 export directory, calibration set directory) with 8 feeds of the tiny UNet that LocRef runs
    (extra tokens and region masks: plain and masked attentions side by side)."""
    features = "extra_tokens,regions"
    export = tiny_export(features=features)
    return export, write_synthetic_set(export, tmp_path_factory.mktemp("calibration") / "set", "locref", features)


@pytest.fixture(scope="session")
def int8_export(synthetic_set, tmp_path_factory):
    """(fp32 export, INT8 export, its QuantisationReport): the synthetic set quantised with the default settings."""
    from vgrt.calibration.int8 import Int8Settings, quantize_export

    export, calibration = synthetic_set
    out, report = quantize_export(export, calibration, tmp_path_factory.mktemp("int8") / "unet-int8", Int8Settings())
    return export, out, report
