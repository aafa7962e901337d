"""The context a timing is meaningless without: machine, library versions and peak memory."""

import importlib.metadata
import os
import platform
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Versions recorded with every run, where installed.
_PACKAGES = (
    "vgrt",
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "onnxscript",
    "openvino",
    "numpy",
    "diffusers",
    "triton",
    "tensorrt",
)


def machine_info() -> dict[str, object]:
    import torch

    from vgrt.engines.cpu_features import read_cpu_features

    cpu = read_cpu_features()
    info: dict[str, object] = {
        "cpu": cpu.model,
        # Which precisions have matrix units decides the CPU figures (bf16 and int8 are emulated without them).
        "cpu_units": cpu.describe(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "os": platform.platform(),
        "python": platform.python_version(),
        # Other processes' load skews timings (an OpenMP barrier waits for a busy core): keep it on record.
        "load_average_at_start": os.getloadavg(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return info


def library_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# peak_rss_window resets the kernel's high-water mark; the process's peak before each reset is kept here.
_peak_before_reset = 0


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return max(peak, _peak_before_reset)


def memory_peaks() -> dict[str, int]:
    """Peak host memory of this process and, where CUDA was used, peak GPU memory PyTorch allocated."""
    import torch

    peaks = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_initialized():
        peaks["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peaks


ANON_SAMPLE_S = 0.05  # how often peak_rss_window reads the anonymous memory (the kernel keeps no peak of it)


@contextmanager
def peak_rss_window() -> Iterator[dict[str, int]]:
    """Peak resident memory of this process while the block runs, set in the yielded dict at exit as
    'peak_rss_bytes' and 'peak_anon_bytes'. Linux resets the high-water mark (VmHWM) through
    /proc/self/clear_refs; where that is not possible the dict stays empty. The resident peak counts the
    pages of mapped files, which the kernel can drop and read again (OpenVINO maps its compiled-model cache
    blob: 3.5 GB of SD 1.5's UNet); 'peak_anon_bytes' is the part it cannot, the largest RssAnon sampled
    every ANON_SAMPLE_S seconds (a spike shorter than that can be missed)."""
    global _peak_before_reset
    found: dict[str, int] = {}
    before = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        yield found
        return
    _peak_before_reset = before
    with _anon_peak_sampled() as anon:
        yield found
    found["peak_rss_bytes"] = _status_bytes("VmHWM:")
    found["peak_anon_bytes"] = anon["peak"]


@contextmanager
def _anon_peak_sampled() -> Iterator[dict[str, int]]:
    """{'peak': the largest RssAnon seen} while the block runs, read by a thread every ANON_SAMPLE_S seconds."""
    import threading

    peak = {"peak": _status_bytes("RssAnon:")}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(ANON_SAMPLE_S):
            peak["peak"] = max(peak["peak"], _status_bytes("RssAnon:"))

    thread = threading.Thread(target=sample, name="vgrt-anon-memory", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak["peak"] = max(peak["peak"], _status_bytes("RssAnon:"))


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (reported in kB), in bytes; 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0
