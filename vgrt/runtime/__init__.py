"""Runtime loops over any UNet runner: schedulers, DDIM inversion, sampling with classifier-free guidance.

Importing vgrt.runtime is light; the names below load their modules (and torch) on first use.
"""

_HOMES = {
    "Conditioning": "conditioning",
    "SchedulerSettings": "schedulers",
    "build_scheduler": "schedulers",
    "SamplingSettings": "sampling",
    "denoise": "sampling",
    "random_latents": "sampling",
    "InversionSettings": "inversion",
    "invert": "inversion",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"vgrt.runtime.{_HOMES[name]}"), name)
