"""The CPU's matrix units, which decide how fast each CPU precision can run.

fp32 runs on any AVX2/AVX-512 unit; bf16 is worth it only with bf16 dot-product units (AVX512_BF16 or
AMX-BF16: about 2.2x the fp32 matrix peak on the CPU vgrt was measured on); int8 only with VNNI or
AMX-INT8 (twice bf16 again). Without those units OpenVINO and ONNX Runtime emulate the narrow types, which
is slower than fp32.
"""

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
VECTOR_FLAGS = ("avx512f", "avx2")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    cores: int  # usable by this process (its affinity), not the machine's count
    flags: frozenset[str] | None  # None where the OS does not say (no /proc/cpuinfo)

    def units(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if self.flags and name in self.flags]

    @property
    def bf16(self) -> bool | None:
        return None if self.flags is None else bool(self.units(BF16_FLAGS))

    @property
    def int8(self) -> bool | None:
        return None if self.flags is None else bool(self.units(INT8_FLAGS))

    def describe(self) -> str:
        """One line: model, cores and which matrix units each precision finds."""
        head = f"{self.model}, {self.cores} core{'s' if self.cores != 1 else ''}"
        if self.flags is None:
            return f"{head}; instruction sets unknown (no {CPUINFO})"
        parts = []
        for precision, names in (("fp32", VECTOR_FLAGS), ("bf16", BF16_FLAGS), ("int8", INT8_FLAGS)):
            found = self.units(names)
            parts.append(f"{precision}: {'+'.join(found).upper()}" if found else f"{precision}: no units (emulated)")
        return f"{head}; {', '.join(parts)}"


def read_cpu_features(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuFeatures(platform.processor() or platform.machine(), cores, None)
    fields = dict(_fields(text))
    return CpuFeatures(fields.get("model name", platform.machine()), cores, frozenset(fields.get("flags", "").split()))


def _fields(text: str):
    """The first processor's `key: value` lines (every core repeats them)."""
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        yield key.strip(), value.strip()
