"""PyTorch eager runner: the reference every other backend is checked against."""

import torch

from vgrt.engines.base import Runner
from vgrt.export.spec import ComponentSpec


class TorchRunner(Runner):
    """Runs an nn.Module under inference mode; its forward takes the spec's inputs by name.

    A call keeps no state: outputs are fresh tensors and vgrt's modules take their conditioning as forward
    arguments (never stored on the module), so concurrent calls need no per-call context.
    """

    backend = "torch"

    def __init__(
        self, module: torch.nn.Module, spec: ComponentSpec, device: str = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__(spec)
        self.module, self.device, self.dtype = module, torch.device(device), dtype

    def activate_impl(self) -> None:
        self.module.to(self.device, self.dtype).eval()

    def deactivate_impl(self) -> None:
        self.module.to("cpu")

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in feed.items()}
        with torch.inference_mode():
            out = self.module(**inputs)
        outputs = (out,) if isinstance(out, torch.Tensor) else out
        return {t.name: value for t, value in zip(self.spec.outputs, outputs)}
