"""Every method's step loops under the residency guard (vgrt.runtime.residency): on the simulated device,
no host read, sync or cross-device copy happens inside a loop, and the result is the one the method
gives without the guard, bit for bit."""

import pytest
import torch

from vgrt.runtime.methods import aicomposer, locref, mca_ctrl, vcf
from vgrt.runtime.methods import visual_prompts as vp
from vgrt.runtime.methods.pno import PnoSettings
from vgrt.runtime.residency import ResidencyError, ResidencyGuard, is_on_device

from . import test_aicomposer, test_locref, test_mca_ctrl, test_vcf, test_visual_prompts

CASES = {
    "mca_ctrl edit": (mca_ctrl, lambda: test_mca_ctrl.request("edit")),
    "mca_ctrl generate": (mca_ctrl, lambda: test_mca_ctrl.request("generate")),
    "aicomposer": (aicomposer, test_aicomposer.request),
    "locref": (locref, test_locref.request),
    "vcf with pno": (vcf, lambda: test_vcf.request(steps=2, pno=PnoSettings(iterations=1, shuffles=2))),
    "visual_prompts with guidance": (vp, lambda: test_visual_prompts.request(steps=2, guidance_steps=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_step_loops_stay_on_the_device_and_give_the_same_result(composers, case):
    method, request = CASES[case]
    composer = composers("onnxruntime")
    expected = method.compose(composer, request())
    with ResidencyGuard() as guard, guard.pipeline(composer):
        got = method.compose(composer, request())
    assert is_on_device(got.latents) and is_on_device(got.image)
    assert torch.equal(got.latents, expected.latents)
    assert composer.device == torch.device("cpu")  # the composer is given back as it was


def test_a_method_that_pins_a_feed_to_the_host_fails_under_the_guard(composers, monkeypatch):
    """The guard catches the bug it was made for: MCA-Ctrl's phase feeds built on the host, as they were."""
    real = mca_ctrl.unet_inputs
    monkeypatch.setattr(mca_ctrl, "unet_inputs", lambda *args: real(*args[:-1], torch.device("cpu")))
    composer = composers("onnxruntime")
    with ResidencyGuard() as guard, guard.pipeline(composer), pytest.raises(ResidencyError) as caught:
        mca_ctrl.compose(composer, test_mca_ctrl.request("edit"))
    message = str(caught.value)
    assert "the engine input 'encoder_hidden_states', a host tensor (6, 77, 32), is copied to the device" in message
    assert "inside the 'denoise' step loop" in message
