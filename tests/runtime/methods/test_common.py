"""The start every method shares runs its checks before any engine, in order; gate columns go by name."""

import pytest
import torch

from vgrt.errors import InvalidInputError
from vgrt.models.processors import EXTRA_GATE, MUTUAL_GATE
from vgrt.runtime.methods.common import layer_gates, start


class Recorder:
    """A composer and a request that record what `start` asks of them, in order."""

    def __init__(self, fail_at: str | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.preset = type("Preset", (), {"vae_factor": 8})()

    def record(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_at:
            raise InvalidInputError(f"{name} refused")

    def validate(self):
        self.record("validate")

    def check_image_size(self, width, height):
        self.record(f"size {width}x{height}")

    def runner(self, component, features="none"):
        self.record(f"{component} {features}")
        return "unet runner"

    def open(self, *components):
        self.record("open " + ",".join(components))


def test_start_checks_everything_before_opening_any_engine():
    recorder = Recorder()
    run = start(recorder, recorder, (64, 32), "mutual", ("vae_decoder",), check=lambda: recorder.record("check"))
    assert recorder.calls == ["validate", "check", "size 64x32", "unet mutual", "open vae_decoder"]
    assert run.unet == "unet runner" and run.latent_hw == (4, 8) and run.times.seconds == {}
    for failing in ("validate", "check", "size 64x32"):
        recorder = Recorder(fail_at=failing)
        with pytest.raises(InvalidInputError, match=f"{failing} refused"):
            start(recorder, recorder, (64, 32), "mutual", ("vae_decoder",), check=lambda r=recorder: r.record("check"))
        assert not any(call.startswith(("unet", "open")) for call in recorder.calls)


def test_layer_gates_set_the_named_columns():
    gates = layer_gates(3, torch.device("cpu"), extra=1.0)
    assert gates.shape == (3, 2)
    assert torch.equal(gates[:, EXTRA_GATE], torch.ones(3)) and torch.equal(gates[:, MUTUAL_GATE], torch.zeros(3))
    assert torch.equal(layer_gates(2, torch.device("cpu"), mutual=0.5)[:, MUTUAL_GATE], torch.full((2,), 0.5))
