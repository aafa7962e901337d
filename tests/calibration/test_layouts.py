"""Every UNet a method run calls is calibrated: MCA-Ctrl on the tiny preset inverts with the plain UNet and
denoises with the mutual one; the capture keeps both, each quantises into an export of its own feature
set, and a compose given both runs each call on its INT8 UNet.

The tests that run MCA-Ctrl are slow on a cold export cache (about a minute: the tiny exports of both
UNets and the encoders), seconds once the session's cache holds them."""

from pathlib import Path

import pytest
import torch

from vgrt.cli import main
from vgrt.models.presets import get_preset
from vgrt.models.source import ModelSource

pytest.importorskip("onnxruntime.quantization")


def mca_ctrl_runs():
    from vgrt.calibration.capture import example_runs

    return example_runs("mca-ctrl", get_preset("tiny"), size=32, steps=4, seeds=(0,))


@pytest.fixture(scope="module")
def mca_ctrl_set(tmp_path_factory, composer_cache):
    """A calibration set of one 4-step MCA-Ctrl run on tiny: 4 inversion calls, 4 denoising calls (quantising
    needs 4 samples)."""
    from vgrt.calibration.capture import capture

    directory = tmp_path_factory.mktemp("layouts") / "set"
    return capture(directory, ModelSource("tiny"), mca_ctrl_runs(), cache=composer_cache, progress=False)


@pytest.fixture(scope="module")
def int8_unets(mca_ctrl_set, composer_cache):
    """(printed, mutual export, plain export): `vgrt calibrate mca-ctrl --from-set`, run as the user runs it
    for the method's own UNet and then for the plain one."""
    import contextlib
    import io

    base = mca_ctrl_set.directory.parent
    common = ["calibrate", "mca-ctrl", "--preset", "tiny", "--from-set", "--set", str(mca_ctrl_set.directory)]
    common += ["--cache", str(composer_cache)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*common, "--out", str(base / "int8")]) == 0
        assert main([*common, "--features", "none", "--out", str(base / "int8-none")]) == 0
    return printed.getvalue(), base / "int8", base / "int8-none"


@pytest.mark.slow
def test_the_capture_keeps_both_unets_of_a_run_with_their_feature_sets(mca_ctrl_set):
    plain, mutual = mca_ctrl_set.runs.values()
    assert (plain.features, plain.calls, plain.samples) == ("none", 4, 4)  # the inversion
    assert (mutual.features, mutual.calls, mutual.samples) == ("mutual", 4, 4)  # the denoising
    assert plain.run_key == mutual.run_key == mca_ctrl_runs()[0].key
    assert "q_index" in mutual.inputs and set(plain.inputs) == {"sample", "timestep", "encoder_hidden_states"}
    feeds = list(mca_ctrl_set.samples([mutual]))
    assert not torch.equal(feeds[0]["sample"], feeds[-1]["sample"])  # copies, not the reused buffer


@pytest.mark.slow
def test_each_unet_quantises_into_an_export_of_its_feature_set(int8_unets):
    from vgrt.export.manifest import read_manifest

    printed, own, plain = int8_unets
    assert tuple(read_manifest(own).components["unet"].features) == ("mutual",)
    assert tuple(read_manifest(plain).components["unet"].features) == ()
    assert read_manifest(plain).precision == "int8"
    # the first run names the command for the plain UNet, and the compose that takes both
    assert f"--from-set --set {own.parent / 'set'} --features none --out {own}-none" in printed
    assert f"--precision int8 --calibrated {own} --calibrated {own}-none" in printed
    # the second, for the plain UNet, names the compose that takes it with the own one
    assert f"--precision int8 --calibrated OWN --calibrated {plain}" in printed


@pytest.mark.slow
def test_a_compose_given_both_runs_each_call_on_its_int8_unet(int8_unets, composer_cache):
    from vgrt.runtime.composer import Composer

    _, own, plain = int8_unets
    opened = []

    def hook(component, runner):
        if component == "unet":
            opened.append(Path(runner.path))
        return runner

    (run,) = mca_ctrl_runs()
    with Composer(ModelSource("tiny"), cache=composer_cache, calibrated=(own, plain), runner_hook=hook) as composer:
        run.compose(composer, run.request)
    assert sorted(folder for path in opened for folder in (own, plain) if path.is_relative_to(folder)) == sorted(
        [own, plain]
    )
    assert len(opened) == 2


@pytest.mark.parametrize(
    "run, fix",
    [
        (None, "capture again into a new set, `vgrt calibrate mca-ctrl --capture-only --set NEW_SET`, then quantise"),
        ("mca-ctrl-0", "mca-ctrl's runs call no other UNet: choose --features mutual"),
    ],
)
def test_a_set_without_the_unet_asked_for_is_refused_with_what_it_holds(tmp_path, capsys, run, fix):
    """run None: a set captured before runs kept every UNet, which holds MCA-Ctrl's own (mutual) only."""
    from vgrt.calibration.capture import model_identity
    from vgrt.calibration.dataset import CapturedRun, open_for_capture
    from vgrt.export.feeds import random_feed
    from vgrt.export.spec import unet_spec

    spec = unet_spec(get_preset("tiny"), frozenset({"mutual"}), "float32", num_blocks=2)
    feed = random_feed(spec, {**spec.profile_sizes("min"), "height": 16, "width": 16})
    inputs = {name: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for name, v in feed.items()}
    entry = CapturedRun("mca-ctrl-0", "mca-ctrl", 0, 4, (32, 32), "mutual", inputs, 8, 1, "", 0, "", run=run)
    with open_for_capture(tmp_path / "set", model_identity(ModelSource("tiny"))) as writer:
        writer.add_run(entry, [feed])
    args = ["calibrate", "mca-ctrl", "--from-set", "--set", str(tmp_path / "set"), "--features", "none"]
    assert main([*args, "--out", str(tmp_path / "int8")]) == 2
    err = capsys.readouterr().err
    assert "holds no calls of mca-ctrl's UNet with features none; it holds: mca-ctrl (features mutual)" in err
    assert fix in err
    assert not (tmp_path / "int8").exists()
