"""vgrt: a deployment runtime for image-guided Stable Diffusion.

Importing vgrt is light: it loads no torch, CUDA, TensorRT or network code. Submodules load their
heavy dependencies on first use.
"""

from vgrt.errors import VgrtError

__version__ = "0.1.0"
__all__ = ["VgrtError", "__version__"]
