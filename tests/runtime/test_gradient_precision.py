"""--gradient-precision: bf16 autocast only when asked, fp32 adds nothing, and bf16 is refused where the
device has no bf16 arithmetic, naming the fix."""

import pytest
import torch
from torch import nn

from vgrt.cli import main
from vgrt.errors import InvalidInputError
from vgrt.models.presets import get_preset
from vgrt.runtime.gradient_precision import GRADIENT_PRECISIONS, check_gradient_precision, gradient_autocast
from vgrt.runtime.methods.registry import METHODS

from .cpu import pretend_cpu


def test_bf16_runs_the_matrix_products_in_bf16_and_fp32_adds_no_context():
    layer = nn.Linear(8, 8)
    inputs = torch.randn(2, 8)
    with gradient_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert layer(inputs).dtype == torch.bfloat16
    with gradient_autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert layer(inputs).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # the parameters stay fp32 either way


def test_an_unknown_precision_is_refused():
    with pytest.raises(InvalidInputError, match="unknown gradient precision 'fp16' .*choose one of: fp32, bf16"):
        check_gradient_precision("fp16")
    with pytest.raises(InvalidInputError, match="unknown gradient precision"):
        gradient_autocast("fp16", "cpu")


@pytest.mark.parametrize("flags", [("avx512f", "avx512_vnni"), (None,)], ids=["no-bf16-units", "flags-unknown"])
def test_bf16_is_refused_on_a_cpu_without_bf16_units(monkeypatch, flags):
    pretend_cpu(monkeypatch, *flags)
    with pytest.raises(InvalidInputError) as refused:
        check_gradient_precision("bf16", "cpu")
    message = str(refused.value)
    assert "--gradient-precision bf16 needs a CPU with bf16 units (AVX512_BF16 or AMX_BF16)" in message
    assert "test CPU" in message and message.endswith("use --gradient-precision fp32")
    check_gradient_precision("fp32", "cpu")  # fp32 runs anywhere
    check_gradient_precision("bf16")  # without a device only the name is checked


def test_bf16_is_accepted_on_a_cpu_with_bf16_units(monkeypatch):
    for units in ("avx512_bf16", "amx_bf16"):
        pretend_cpu(monkeypatch, "avx512f", units)
        check_gradient_precision("bf16", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bf16_is_refused_on_cuda_without_a_gpu():
    with pytest.raises(InvalidInputError, match="needs a GPU with bf16 support .*use --gradient-precision fp32"):
        check_gradient_precision("bf16", "cuda")


def test_the_methods_with_gradient_steps_offer_every_precision():
    for name in ("vcf", "visual-prompts"):
        option = next(o for o in METHODS[name].options if o.name == "gradient_precision")
        assert (
            option.choices == GRADIENT_PRECISIONS and option.default == "fp32" and option.flag == "--gradient-precision"
        )


def test_the_option_reaches_each_methods_gradient_steps(examples):
    reference = str(examples / "subject.png")

    def build(method, **values):
        return METHODS[method].request(values, get_preset("tiny"))

    assert (
        build("vcf", prompt="a fox", reference=reference, pno_steps=1, gradient_precision="bf16").pno.precision
        == "bf16"
    )
    assert build("vcf", prompt="a fox", reference=reference, pno_steps=1).pno.precision == "fp32"
    assert build("visual-prompts", object=[reference], gradient_precision="bf16").gradient_precision == "bf16"
    with pytest.raises(InvalidInputError, match="--gradient-precision 'fp16' is not one of: fp32, bf16"):
        build("visual-prompts", object=[reference], gradient_precision="fp16")


def test_the_command_line_refuses_bf16_before_any_engine_runs(examples, tmp_path, monkeypatch, capsys):
    pretend_cpu(monkeypatch, "avx2")
    arguments = ["compose", "vcf", "--prompt", "a fox", "--reference", str(examples / "subject.png"), "--pno-steps", "1",
                 "--gradient-precision", "bf16", "--steps", "2", "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(arguments) == 2
    assert "--gradient-precision bf16 needs a CPU with bf16 units" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing exported
