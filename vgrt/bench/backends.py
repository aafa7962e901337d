"""Which backends a suite can time on this machine, and why the others cannot run here.

PyTorch eager is every suite's baseline: it is always timed, and runs on the GPU when one is present.
"""

import importlib.util

from vgrt.bench.suites import Suite
from vgrt.errors import InvalidInputError

BACKENDS: dict[str, str] = {
    "torch": "PyTorch eager, the baseline (on the GPU when one is present)",
    "onnxruntime": "ONNX Runtime, CPU execution provider",
    "onnxruntime-cuda": "ONNX Runtime, CUDA execution provider",
    "tensorrt": "TensorRT engine",
    "triton": "vgrt's Triton masked-attention kernel (skips fully masked key tiles)",
}
BASELINE = "torch"

# The `vgrt doctor` checks each backend needs to pass.
_DOCTOR_CHECKS = {
    "torch": (),
    "onnxruntime": ("onnxruntime",),
    "onnxruntime-cuda": ("gpu", "onnxruntime-cuda"),
    "tensorrt": ("gpu", "tensorrt"),
    "triton": ("gpu", "triton"),
}


def _vgrt_part_missing(backend: str) -> str | None:
    """Why vgrt itself cannot drive `backend` yet, if it cannot."""
    if backend == "tensorrt":
        from vgrt.engines import BACKENDS as RUNNERS

        return None if "tensorrt" in RUNNERS else "vgrt.engines has no TensorRT runner yet"
    if backend == "triton" and importlib.util.find_spec("vgrt.plugins.masked_attention.triton_kernel") is None:
        return "vgrt's Triton kernel (vgrt/plugins/masked_attention/triton_kernel.py) is not in this version"
    return None


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else every reason it cannot, joined."""
    from vgrt.doctor import CHECKS

    reasons = []
    for check in _DOCTOR_CHECKS[backend]:
        ok, detail = CHECKS[check]()
        if not ok:
            reasons.append(f"{check}: {detail}")
    missing = _vgrt_part_missing(backend)
    if missing:
        reasons.append(missing)
    return "; ".join(reasons) or None


def select_backends(suite: Suite, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The backends to time: `requested` (None: every one available here), the baseline first.

    Raises before any work when a name is unknown to the suite or cannot run on this machine.
    """
    if not suite.backends:
        return ()
    reasons = {b: unavailable_reason(b) for b in suite.backends}
    available = [b for b in suite.backends if reasons[b] is None]
    if requested is None:
        return tuple(available)
    unknown = [b for b in requested if b not in suite.backends]
    if unknown:
        raise InvalidInputError(
            f"unknown backend(s) {', '.join(map(repr, unknown))} for the {suite.name} suite; it times: "
            f"{', '.join(suite.backends)} (available here: {', '.join(available)})"
        )
    for backend in requested:
        if reasons[backend]:
            raise InvalidInputError(
                f"backend {backend!r} cannot run here: {reasons[backend]}; available here: {', '.join(available)}"
            )
    return tuple(dict.fromkeys([BASELINE, *requested]))
