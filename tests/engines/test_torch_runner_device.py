"""The torch runner's device and torch.compile settings."""

import pytest
import torch

from vgrt.engines import open_runner, setting_names
from vgrt.errors import InvalidInputError
from vgrt.export import example_feed


def test_compile_mode_and_device_are_torch_settings():
    assert {"device", "compile_mode"} <= setting_names("torch")


def test_unknown_compile_mode_is_refused_before_any_work(tiny_export):
    with pytest.raises(InvalidInputError, match=r"unknown compile mode 'fast'.*reduce-overhead"):
        open_runner(tiny_export(features="all"), backend="torch", compile_mode="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_on_activation(tiny_export):
    runner = open_runner(tiny_export(features="all"), backend="torch", device="cuda")
    assert runner.device == torch.device("cuda")
    with pytest.raises(InvalidInputError, match="sees no CUDA GPU"):
        runner.activate()


@pytest.mark.slow  # inductor compiles the tiny UNet for about a minute on 2 cores
def test_compiled_tiny_unet_matches_eager(tiny_export):
    directory = tiny_export(features="all")
    feed = example_feed(directory, seed=7)
    with open_runner(directory, backend="torch") as eager:
        expected = eager.infer(feed)
    with open_runner(directory, backend="torch", compile_mode="default") as compiled:
        got = compiled.infer(feed)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4)
