"""The GPU an engine is built for and runs on: engines are specific to its model and compute capability."""

from dataclasses import dataclass

from vgrt.errors import VgrtError


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "major.minor"


def current_gpu(index: int = 0) -> Gpu:
    import torch

    if not torch.cuda.is_available():
        raise VgrtError(
            f"TensorRT needs a CUDA GPU, and torch {torch.__version__} sees none (a CPU build of torch, or no "
            "driver); run on a machine with an NVIDIA GPU, or use the onnxruntime backend"
        )
    props = torch.cuda.get_device_properties(index)
    return Gpu(props.name, f"{props.major}.{props.minor}")
