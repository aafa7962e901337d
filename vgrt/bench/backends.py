"""Which backends a suite can time on this machine, and why the others cannot run here.

PyTorch eager is every suite's baseline: it is always timed, and runs on the GPU when one is present.
"""

from vgrt.bench.suites import Suite
from vgrt.errors import InvalidInputError

BASELINE = "torch"

# The `vgrt doctor` checks each backend needs to pass.
_DOCTOR_CHECKS = {
    "torch": (),
    "torch-bf16": (),  # PyTorch's own bf16 peer: the same module under CPU autocast
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
    "openvino-bf16": ("openvino", "openvino-bf16"),
    "openvino-dynamic": ("openvino",),  # static_shapes=False: what the default's static shapes are timed against
    "onnxruntime-int8": ("onnxruntime",),  # the INT8 export of `vgrt calibrate` (--quantised)
    "openvino-int8": ("openvino",),
    "vgrt-onnxruntime": ("onnxruntime",),
    "vgrt-openvino": ("openvino",),
    "vgrt-openvino-bf16": ("openvino", "openvino-bf16"),
    "optimum-intel": (),  # installed into an environment of its own on first use (vgrt.bench.peer_env)
    "optimum-intel-bf16": ("openvino-bf16",),
    "onnxruntime-cuda": ("gpu", "onnxruntime-cuda"),
    "tensorrt": ("gpu", "tensorrt", "polygraphy"),
    "triton": ("gpu", "triton"),
}


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else every reason it cannot, joined."""
    from vgrt.doctor import CHECKS

    reasons = []
    for check in _DOCTOR_CHECKS[backend]:
        ok, detail = CHECKS[check]()
        if not ok:
            reasons.append(f"{check}: {detail}")
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
