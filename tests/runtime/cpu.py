"""A stand-in for the CPU's features, so that a test sees the CPU it needs whatever CPU runs it."""

from vgrt.engines.cpu_features import CpuFeatures


def pretend_cpu(monkeypatch, *flags: str) -> None:
    """`read_cpu_features()` answers a CPU with these instruction-set flags (`None`: flags unknown)."""
    features = CpuFeatures("test CPU", 2, None if flags == (None,) else frozenset(flags))
    monkeypatch.setattr("vgrt.engines.cpu_features.read_cpu_features", lambda *args: features)
