"""The methods `vgrt bench compose` times, each as one entry: a request builder on synthetic inputs.

A builder takes the inputs and the step count and returns the method's `compose` function with a
request; it imports the method module when called, so this module stays light. To add a method, add
one function and one METHODS entry (its name as `vgrt compose` spells it). The inputs are the images
of `vgrt examples` (a red disc on a light background, sky over grass, their masks and a box).
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Compose = Callable[[Any, Any], Any]  # (Composer, request) -> Composition


@dataclass(frozen=True)
class Inputs:
    """The example images at one square size, as tensors [1, C, size, size]; `box` is the region's box."""

    size: int
    subject: torch.Tensor
    subject_mask: torch.Tensor
    scene: torch.Tensor
    region_mask: torch.Tensor
    box: Any  # vgrt.runtime.images.Box

    @classmethod
    def make(cls, size: int) -> "Inputs":
        from vgrt.runtime.examples import write_examples
        from vgrt.runtime.images import Box, load_image, load_mask

        with tempfile.TemporaryDirectory(prefix="vgrt-bench-inputs-") as tmp:
            files = {path.name: path for path in write_examples(tmp, size)}
            square = (size, size)
            return cls(
                size,
                load_image(files["subject.png"]),
                load_mask(files["subject_mask.png"], square),
                load_image(files["scene.png"]),
                load_mask(files["region_mask.png"], square),
                Box.parse(files["box.txt"].read_text().strip()),
            )


def _mca_ctrl(inputs: Inputs, steps: int) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import mca_ctrl

    request = mca_ctrl.McaCtrlRequest(
        inputs.subject, inputs.subject_mask, inputs.scene, inputs.region_mask, mode="edit", prompt="a red ball",
        steps=steps,
    )  # fmt: skip
    return mca_ctrl.compose, request


def _locref(inputs: Inputs, steps: int) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import locref

    request = locref.LocRefRequest(
        "a red ball on the grass", (inputs.subject,), (inputs.box,), inputs.size, inputs.size, steps=steps
    )
    return locref.compose, request


def _aicomposer(inputs: Inputs, steps: int) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import aicomposer

    inverted = max(1, steps // 2)  # the code's windows, scaled from its 20 steps: inverts 10, tokens to 16, AdaIN to 14
    request = aicomposer.AIComposerRequest(
        inputs.subject, inputs.subject_mask, inputs.scene, inputs.region_mask, prompt="a red ball", steps=steps,
        inversion_steps=inverted, image_token_end=max(inverted, steps * 16 // 20),
        adain_end=max(inverted, steps * 14 // 20),
    )  # fmt: skip
    return aicomposer.compose, request


def _vcf(inputs: Inputs, steps: int, pno: Any = None) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import vcf

    request = vcf.VcfRequest("a red ball on the grass", inputs.subject, inputs.size, inputs.size, steps=steps, pno=pno)
    return vcf.compose, request


def _vcf_pno(inputs: Inputs, steps: int) -> tuple[Compose, Any]:
    from vgrt.runtime.methods.pno import PnoSettings

    return _vcf(inputs, steps, PnoSettings())


def _visual_prompts(inputs: Inputs, steps: int) -> tuple[Compose, Any]:
    from vgrt.runtime.methods import visual_prompts

    request = visual_prompts.VisualPromptsRequest(
        (inputs.subject,), inputs.size, inputs.size, prompt="a red ball on the grass", steps=steps,
        guidance_steps=min(steps, visual_prompts.VisualPromptsRequest.guidance_steps),
    )  # fmt: skip
    return visual_prompts.compose, request


METHODS: dict[str, Callable[[Inputs, int], tuple[Compose, Any]]] = {
    "mca-ctrl": _mca_ctrl,
    "aicomposer": _aicomposer,
    "locref": _locref,
    "vcf": _vcf,
    "vcf-pno": _vcf_pno,
    "visual-prompts": _visual_prompts,
}
