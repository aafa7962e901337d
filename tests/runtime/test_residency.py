"""The residency guard: every forbidden operation raises inside a step loop, naming the op and the line;
host tensors, reads outside the loop and the real sampling and inversion loops pass."""

import numpy as np
import pytest
import torch

from vgrt.runtime.inversion import InversionSettings, invert
from vgrt.runtime.residency import (
    SIMULATED_DEVICE,
    ResidencyError,
    ResidencyGuard,
    host_reads_allowed,
    is_on_device,
    step_loop,
)
from vgrt.runtime.sampling import SamplingSettings, denoise, random_latents
from vgrt.runtime.schedulers import build_scheduler

from .helpers import LATENT, ROWS, clean_latents, relative_error, text_conditioning

HOST_READS = {
    "item": lambda x: x[0].item(),
    "__bool__": lambda x: bool(x[0] > 0),
    "__float__": lambda x: float(x[0]),
    "__int__": lambda x: int(x[0]),
    "__index__": lambda x: [1, 2][x[0].long()],
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "__array__": lambda x: np.asarray(x),
    "cpu": lambda x: x.cpu(),
    "to": lambda x: x.to("cpu"),
}
SYNCS = {
    "nonzero": lambda x: x.nonzero(),
    "masked_select": lambda x: x.masked_select(x > 0),
    "where": lambda x: torch.where(x > 0),
    "boolean mask": lambda x: x[x > 0],
    "Python list": lambda x: x[[0, 1]],
}


def device_tensor() -> torch.Tensor:
    return torch.arange(4.0, device=SIMULATED_DEVICE)


@pytest.mark.parametrize("op", HOST_READS)
def test_a_host_read_of_a_device_tensor_in_a_step_loop_raises(op):
    with ResidencyGuard():
        x = device_tensor()
        with step_loop("denoise"), pytest.raises(ResidencyError) as caught:
            HOST_READS[op](x)
    message = str(caught.value)
    assert f"Tensor.{op}" in message and "device tensor" in message
    assert "inside the 'denoise' step loop" in message and "test_residency.py" in message


@pytest.mark.parametrize("op", SYNCS)
def test_a_data_dependent_shape_in_a_step_loop_raises(op):
    with ResidencyGuard():
        x = device_tensor()
        with step_loop("invert"), pytest.raises(ResidencyError, match=r"(syncs|data-dependent).*'invert' step loop"):
            SYNCS[op](x)


@pytest.mark.parametrize(
    "copy",
    [
        lambda x, host: host.to(SIMULATED_DEVICE),
        lambda x, host: x.copy_(host),
        lambda x, host: x.__setitem__(slice(0, 4), host),
        lambda x, host: torch.as_tensor(host, device=SIMULATED_DEVICE),
        lambda x, host: host.copy_(x),
    ],
    ids=["to", "copy_", "setitem", "as_tensor", "to the host"],
)
def test_a_copy_across_devices_in_a_step_loop_raises_and_outside_passes(copy):
    with ResidencyGuard():
        x, host = device_tensor(), torch.ones(4)
        with step_loop("denoise"), pytest.raises(ResidencyError, match=r"copies a (host|device) tensor \(4,\)"):
            copy(x, host)
        copy(x, host)  # outside a loop a transfer is how data reaches the device


def test_mixing_devices_raises_anywhere_but_a_zero_dim_host_tensor_mixes():
    with ResidencyGuard():
        x = device_tensor()
        with pytest.raises(ResidencyError, match=r"add mixes a device tensor \(4,\) with a host tensor \(4,\)"):
            x + torch.ones(4)
        assert is_on_device(x * torch.tensor(2.0))  # a CPU scalar tensor, as torch allows with CUDA tensors


def test_host_tensors_are_read_freely_and_device_tensors_outside_loops_and_where_allowed():
    with ResidencyGuard():
        timesteps, x = torch.arange(10), device_tensor()
        with step_loop("denoise"):
            assert bool(timesteps[3] >= 0) and timesteps.tolist()[0] == 0  # the schedulers' own reads
            with host_reads_allowed("validated once"):
                assert x.sum().item() == 6.0
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and x.cpu().device == torch.device("cpu")
        assert not is_on_device(x.cpu())


def test_device_tensors_propagate_and_report_the_simulated_device():
    with ResidencyGuard():
        x = device_tensor()
        y = torch.zeros_like(x)
        z = torch.empty(3, device=x.device)  # device=x.device follows x
        view = x[1:]
        host = torch.zeros(3)
        host.add_(1)
        assert all(map(is_on_device, (x, y, z, view, x * 2, x.to(torch.float64))))
        assert not is_on_device(host) and x.device == SIMULATED_DEVICE and host.device == torch.device("cpu")
        buffer = torch.zeros(4)
        buffer.copy_(x)  # a transfer to the host, outside a loop: the buffer stays where it is
        x.grad = torch.ones(4, device=SIMULATED_DEVICE)
        assert not is_on_device(buffer) and is_on_device(torch.ones(4).to(SIMULATED_DEVICE)) and is_on_device(x.grad)


def test_runner_outputs_are_device_tensors_and_host_feeds_in_a_loop_raise(runners):
    runner = runners["onnxruntime"]
    generator = torch.Generator().manual_seed(0)
    feed = {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.ones(1),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
    }
    with ResidencyGuard() as guard:
        out = runner.infer(feed)  # the host feed of an encoder call outside loops is fine
        assert all(map(is_on_device, out.values()))
        device_feed = {name: value.to(guard.device) for name, value in feed.items()}
        with step_loop("denoise"):
            runner.infer(device_feed, validate=False)
            with pytest.raises(ResidencyError, match=r"engine input 'timestep', a host tensor \(1,\)"):
                runner.infer({**device_feed, "timestep": torch.ones(1)}, validate=False)


@pytest.mark.parametrize("kind", ["ddim", "dpmsolver++"])
def test_sampling_and_inversion_loops_pass_the_guard_with_unchanged_results(runners, kind):
    runner = runners["onnxruntime"]
    settings = SamplingSettings(steps=4, guidance_scale=5.0, progress=False)

    def run(device):
        noise = random_latents((ROWS, 4, LATENT, LATENT), torch.Generator().manual_seed(0), device=device)
        latents = denoise(runner, build_scheduler(kind), noise, text_conditioning(), settings)
        trajectory = invert(
            runner, build_scheduler("ddim_inverse"), clean_latents().to(device), text_conditioning(),
            InversionSettings(steps=4, progress=False),
        )  # fmt: skip
        return latents, trajectory

    expected = run("cpu")
    with ResidencyGuard() as guard:
        got = run(guard.device)
        assert is_on_device(got[0]) and is_on_device(got[1])
    for a, b in zip(got, expected):
        assert relative_error(a, b) == 0.0


def test_a_hook_that_reads_the_latents_fails_the_loop(runners):
    def before_step(i, t, latents, feed):
        if latents.abs().max() > 100:  # a host read per step
            raise AssertionError

    with ResidencyGuard() as guard:
        noise = random_latents((ROWS, 4, LATENT, LATENT), torch.Generator().manual_seed(0), device=guard.device)
        with pytest.raises(ResidencyError, match=r"Tensor.__bool__ .* 'denoise' step loop, at .*in before_step"):
            denoise(
                runners["onnxruntime"], build_scheduler("ddim"), noise, text_conditioning(),
                SamplingSettings(steps=2, guidance_scale=5.0, progress=False), before_step=before_step,
            )  # fmt: skip
