"""The methods `vgrt bench compose` times, each as one entry: a request builder on synthetic inputs.

A builder takes the inputs and the work asked for (sampling steps, gradient steps) and returns the
method's `compose` function with a request; it imports the method module when called, so this module
stays light. To add a method, add one function and one METHODS entry (its name as `vgrt compose` spells
it). The inputs are the images of `vgrt examples` (a red disc on a light background, sky over grass,
their masks and a box) for one preset.
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vgrt.models.presets import Preset, vision_tokens

Compose = Callable[[Any, Any], Any]  # (Composer, request) -> Composition


@dataclass(frozen=True)
class Work:
    """How much one request runs: sampling steps, and gradient steps (PNO's iterations, the guidance
    steps of visual prompts; None: the method's default)."""

    steps: int
    gradient_steps: int | None = None


@dataclass(frozen=True)
class Inputs:
    """The example images at one square size, as tensors [1, C, size, size], for one preset; `box` is
    the region's box."""

    preset: Preset
    size: int
    subject: torch.Tensor
    subject_mask: torch.Tensor
    scene: torch.Tensor
    region_mask: torch.Tensor
    box: Any  # vgrt.runtime.images.Box

    @classmethod
    def make(cls, preset: Preset, size: int) -> "Inputs":
        from vgrt.runtime.examples import write_examples
        from vgrt.runtime.images import Box, load_image, load_mask

        with tempfile.TemporaryDirectory(prefix="vgrt-bench-inputs-") as tmp:
            files = {path.name: path for path in write_examples(tmp, size)}
            square = (size, size)
            return cls(
                preset,
                size,
                load_image(files["subject.png"]),
                load_mask(files["subject_mask.png"], square),
                load_image(files["scene.png"]),
                load_mask(files["region_mask.png"], square),
                Box.parse(files["box.txt"].read_text().strip()),
            )


def _mca_ctrl(inputs: Inputs, work: Work) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import mca_ctrl

    request = mca_ctrl.McaCtrlRequest(
        inputs.subject, inputs.subject_mask, inputs.scene, inputs.region_mask, mode="edit", prompt="a red ball",
        steps=work.steps,
    )  # fmt: skip
    return mca_ctrl.compose, request


def _locref(inputs: Inputs, work: Work) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import locref

    request = locref.LocRefRequest(
        "a red ball on the grass", (inputs.subject,), (inputs.box,), inputs.size, inputs.size, steps=work.steps
    )
    return locref.compose, request


def _aicomposer(inputs: Inputs, work: Work) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import aicomposer

    steps = work.steps
    inverted = max(1, steps // 2)  # the code's windows, scaled from its 20 steps: inverts 10, tokens to 16, AdaIN to 14
    request = aicomposer.AIComposerRequest(
        inputs.subject, inputs.subject_mask, inputs.scene, inputs.region_mask, prompt="a red ball", steps=steps,
        inversion_steps=inverted, image_token_end=max(inverted, steps * 16 // 20),
        adain_end=max(inverted, steps * 14 // 20),
    )  # fmt: skip
    return aicomposer.compose, request


def _vcf(inputs: Inputs, work: Work, pno: Any = None) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import vcf

    request = vcf.VcfRequest(
        "a red ball on the grass", inputs.subject, inputs.size, inputs.size, tokens=_vcf_tokens(inputs.preset),
        steps=work.steps, pno=pno,
    )  # fmt: skip
    return vcf.compose, request


def _vcf_tokens(preset: Preset) -> str:
    """Every penultimate image token, as the code concatenates them, where the preset's UNet profile takes
    that context; else the class token alone (the SD 1.5 and SDXL profiles stop at 154 tokens)."""
    text_tokens = preset.text_encoder["max_position_embeddings"]
    return "all" if text_tokens + vision_tokens(preset.image_encoder) <= preset.profile.context.max else "cls"


def _vcf_pno(inputs: Inputs, work: Work) -> tuple[Compose, Any]:
    from vgrt.runtime.methods.pno import PnoSettings

    settings = PnoSettings() if work.gradient_steps is None else PnoSettings(iterations=work.gradient_steps)
    return _vcf(inputs, work, settings)


def _visual_prompts(inputs: Inputs, work: Work) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import visual_prompts

    default = visual_prompts.VisualPromptsRequest.guidance_steps
    request = visual_prompts.VisualPromptsRequest(
        (inputs.subject,), inputs.size, inputs.size, prompt="a red ball on the grass", steps=work.steps,
        guidance_steps=min(work.steps, default if work.gradient_steps is None else work.gradient_steps),
    )  # fmt: skip
    return visual_prompts.compose, request


def gradient_steps(request: Any) -> dict[str, int]:
    """The PyTorch gradient stages a request runs, with their step counts: 'pno' (its iterations) for
    VCF with PNO, 'guidance' (its steps) for visual prompts; empty for the methods without gradients."""
    pno = getattr(request, "pno", None)
    counts = {"pno": pno.iterations} if pno is not None else {}
    if getattr(request, "guidance_steps", 0):
        counts["guidance"] = request.guidance_steps
    return counts


METHODS: dict[str, Callable[[Inputs, Work], tuple[Compose, Any]]] = {
    "mca-ctrl": _mca_ctrl,
    "aicomposer": _aicomposer,
    "locref": _locref,
    "vcf": _vcf,
    "vcf-pno": _vcf_pno,
    "visual-prompts": _visual_prompts,
}
