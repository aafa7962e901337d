"""PyTorch runner: the reference every other backend is checked against, and `--backend torch --device cuda`.

On CUDA the masked attention layers call the Triton kernel through the custom op `vgrt::masked_attention`
(vgrt.plugins.masked_attention.torch_op); with `compile_mode` the module runs under `torch.compile`,
which keeps that op as one call (the stable-fast / OneDiff class of deployment).
"""

import torch

from vgrt.engines.base import Runner
from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec

# torch.compile's modes; 'reduce-overhead' adds CUDA graphs on CUDA.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TorchRunner(Runner):
    """Runs an nn.Module under inference mode; its forward takes the spec's inputs by name.

    A call keeps no state: outputs are fresh tensors and vgrt's modules take their conditioning as forward
    arguments (never stored on the module), so concurrent calls need no per-call context.
    """

    backend = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ComponentSpec,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile_mode: str | None = None,
    ):
        """
        Args:
            device: where the module runs ('cpu', 'cuda', 'cuda:1').
            compile_mode: None runs eagerly; else a torch.compile mode (COMPILE_MODES), compiled on
                activation and traced on the first call of each input shape.
        """
        super().__init__(spec)
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise InvalidInputError(
                f"unknown compile mode {compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)} (or none for eager)"
            )
        self.module, self.device, self.dtype, self.compile_mode = module, torch.device(device), dtype, compile_mode
        self._forward = module

    def activate_impl(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {str(self.device)!r} asked for, but torch {torch.__version__} sees no CUDA GPU; "
                "use device='cpu' or run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        self.module.to(self.device, self.dtype).eval()
        if self.compile_mode is not None:
            self._forward = torch.compile(self.module, mode=self.compile_mode, dynamic=False)

    def deactivate_impl(self) -> None:
        self._forward = self.module
        self.module.to("cpu")

    def infer_impl(self, feed: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in feed.items()}
        with torch.inference_mode():
            out = self._forward(**inputs)
        outputs = (out,) if isinstance(out, torch.Tensor) else out
        return {t.name: value for t, value in zip(self.spec.outputs, outputs)}
