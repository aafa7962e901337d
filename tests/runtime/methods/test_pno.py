"""PNO on the tiny preset's PyTorch modules: the loss falls, its gradient is right, checkpointing keeps
memory flat in the sampling steps, a diverging learning rate stops early and keeps the best, and bf16
autocast runs the modules in bf16 with a gradient close to fp32's (or is refused without bf16 units)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vgrt.errors import InvalidInputError
from vgrt.runtime.methods import pno
from vgrt.runtime.schedulers import SchedulerSettings

from ..cpu import pretend_cpu
from ..helpers import relative_error
from .inputs import random_image

TEXT, IMAGE, DIM = 77, 17, 32  # tiny: 77 text tokens, 1 + (32/8)^2 image tokens, 32-d context


@pytest.fixture(scope="module")
def models(composers):
    return pno.PnoModels.from_composer(composers("torch"))


def problem(models, steps, dtype=torch.float32, **settings):
    """(objective, conditional context, x_T) of a fused context over 8x8 latents, seeded."""
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(1, TEXT + IMAGE, DIM, generator=generator, dtype=dtype)
    uncond = F.pad(torch.randn(1, TEXT, DIM, generator=generator, dtype=dtype), (0, 0, 0, IMAGE))
    noise = torch.randn(1, 4, 8, 8, generator=generator, dtype=dtype)
    objective = pno.PnoObjective(
        models, SchedulerSettings.for_preset("tiny"), random_image(1, 24).to(dtype), uncond, steps, 7.5,
        pno.PnoSettings(**settings),
    )  # fmt: skip
    return objective, cond, noise


def test_pno_lowers_its_loss(models):
    objective, cond, noise = problem(models, steps=2)
    result = pno.optimize(objective, cond, noise, pno.PnoSettings(iterations=4), progress=False)
    losses = result.losses
    assert result.stopped is None and len(losses) == 5 and len(result.iteration_seconds) == 4
    assert losses[-1] < losses[0] and sum(losses[3:]) / 2 < sum(losses[:2]) / 2
    assert result.best == losses.index(min(losses)) > 0
    with torch.no_grad():  # the variables returned are the ones that scored the best loss
        again = objective(result.context, result.noise, torch.Generator().manual_seed(result.best)).total.item()
    assert again == pytest.approx(min(losses), rel=1e-5)


def test_loss_gradient_matches_finite_differences(models):
    """float64 copies of the modules; directional derivatives along random directions."""
    double = pno.PnoModels(*(copy.deepcopy(m).double() for m in (models.unet, models.decoder, models.image_encoder)))
    objective, cond, noise = problem(double, steps=2, dtype=torch.float64)
    noise = 1.3 * noise  # off unit variance, so that the noise regularizer contributes to the gradient

    def loss(context, x):
        return objective(context, x, torch.Generator().manual_seed(5))

    variables = cond.clone().requires_grad_(True), noise.clone().requires_grad_(True)
    terms = loss(*variables)
    assert terms.noise.item() > 0
    terms.total.backward()
    generator, eps = torch.Generator().manual_seed(9), 1e-4
    for index, variable in enumerate(variables):
        direction = torch.randn(variable.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        plus, minus = [cond, noise], [cond, noise]
        plus[index], minus[index] = plus[index] + eps * direction, minus[index] - eps * direction
        with torch.no_grad():
            finite_difference = (loss(*plus).total - loss(*minus).total).item() / (2 * eps)
        analytic = (variable.grad * direction).sum().item()
        assert analytic == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)


def saved_bytes(run, *args):
    """(bytes of the distinct storages autograd keeps for the backward pass while `run(*args)` executes, its
    result). A checkpointed call keeps only its inputs: the tensors inside it are not saved, so not counted."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run(*args)
    return sum(storages.values()), result


def test_checkpointing_keeps_memory_flat_in_the_steps(models):
    growth, gradients = {}, {}
    for checkpoint in (True, False):
        held = {}
        for steps in (2, 4):
            objective, cond, noise = problem(models, steps, checkpoint=checkpoint)
            noise.requires_grad_(True)
            held[steps], terms = saved_bytes(objective, cond, noise, torch.Generator().manual_seed(0))
            terms.total.backward()
            gradients[checkpoint, steps] = noise.grad
        growth[checkpoint] = (held[4] - held[2]) / 2  # bytes per sampling step
    assert growth[False] > 100 * growth[True]
    for steps in (2, 4):  # recomputing the activations gives the same gradient
        torch.testing.assert_close(gradients[True, steps], gradients[False, steps])


def output_dtypes(models):
    """{module name: set of output dtypes of its linear and convolution layers}, filled by hooks while they run."""
    seen = {name: set() for name in ("unet", "decoder", "image_encoder")}
    hooks = [
        layer.register_forward_hook(lambda module, args, output, name=name: seen[name].add(output.dtype))
        for name in seen
        for layer in getattr(models, name).modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
    ]
    return seen, hooks


def pno_gradient(models, precision, checkpoint=True):
    """(gradient of the loss in both variables, flattened; loss) of one PNO step, 2 sampling steps."""
    objective, cond, noise = problem(models, steps=2, precision=precision, checkpoint=checkpoint)
    cond, noise = cond.requires_grad_(True), noise.requires_grad_(True)
    loss = objective(cond, noise, torch.Generator().manual_seed(0)).total
    loss.backward()
    return torch.cat([cond.grad.flatten(), noise.grad.flatten()]), loss


def test_bf16_runs_the_modules_in_bf16_with_a_gradient_close_to_fp32s(models, monkeypatch):
    pretend_cpu(monkeypatch, "avx512f", "avx512_bf16")  # the arithmetic is the same where bf16 is emulated
    gradients, losses = {}, {}
    for precision in ("fp32", "bf16"):
        seen, hooks = output_dtypes(models)
        gradients[precision], losses[precision] = pno_gradient(models, precision)
        for hook in hooks:
            hook.remove()
        expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        assert seen == {name: {expected} for name in seen}, precision
        assert losses[precision].dtype == torch.float32  # outputs cast back: the loss stays fp32
    fp32, bf16 = gradients["fp32"], gradients["bf16"]
    # Measured on tiny: relative error 0.7-2.0e-2 (1 to 10 sampling steps), cosine >= 0.9998; rounding the
    # inputs to bf16 once moves the fp32 gradient by 1.4e-3, another thread count by 1.5e-6.
    assert 2e-3 < relative_error(bf16, fp32) < 5e-2
    assert F.cosine_similarity(bf16, fp32, dim=0) > 0.999
    assert all(p.dtype == torch.float32 for p in models.unet.parameters())
    # Checkpointing recomputes each UNet call under the autocast it ran in: the same gradient.
    torch.testing.assert_close(pno_gradient(models, "bf16", checkpoint=False)[0], bf16)


def test_bf16_is_refused_on_a_cpu_without_bf16_units(models, monkeypatch):
    pretend_cpu(monkeypatch, "avx512f")
    with pytest.raises(InvalidInputError, match="--gradient-precision bf16 needs a CPU with bf16 units"):
        problem(models, steps=1, precision="bf16")
    with pytest.raises(InvalidInputError, match="unknown gradient precision 'fp16'"):
        pno.PnoSettings(precision="fp16")


def test_a_diverging_learning_rate_stops_and_keeps_the_best(models, caplog):
    objective, cond, noise = problem(models, steps=1)
    settings = pno.PnoSettings(iterations=3, lr_prompt=1e30, lr_noise=1e30)
    result = pno.optimize(objective, cond, noise, settings, progress=False)
    assert "at iteration 1" in result.stopped and "PNO stopped" in caplog.text
    assert result.best == 0 and len(result.losses) == 1
    torch.testing.assert_close(result.context, cond)
    torch.testing.assert_close(result.noise, noise)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lr_prompt": float("nan")}, "lr_prompt must be a finite number > 0, got nan"),
        ({"lr_noise": 0.0}, "lr_noise must be a finite number > 0"),
        ({"iterations": -1}, "iterations must be an integer >= 0"),
        ({"block": 0}, "block must be an integer >= 1"),
        ({"noise_weight": -0.5}, "noise_weight must be a finite number >= 0"),
    ],
)
def test_settings_refuse_bad_values(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        pno.PnoSettings(**bad)


def test_noise_regularizer_flags_noise_that_drifts_from_gaussian():
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def score(x):
        return pno.noise_regularizer(x, 4, 20, torch.Generator().manual_seed(1)).item()

    gaussian = score(noise)
    sorted_entries = noise.flatten().sort().values.view_as(noise)  # Gaussian values in a structured order
    for drifted in (1.5 * noise, noise + 0.3, sorted_entries):
        assert score(drifted) > 10 * max(gaussian, 0.1)
    with pytest.raises(InvalidInputError, match="blocks of 3 do not divide"):
        pno.noise_regularizer(noise, 3, 0, torch.Generator())
