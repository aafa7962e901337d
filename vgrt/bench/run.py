"""Run one suite with checked settings and wrap its cases with the machine, versions and peak memory."""

import dataclasses
import importlib
import os
from datetime import datetime, timezone

from vgrt.bench.machine import library_versions, machine_info, memory_peaks
from vgrt.bench.results import BenchRun
from vgrt.bench.settings import BenchSettings
from vgrt.bench.suites import get_suite


def run_bench(settings: BenchSettings) -> BenchRun:
    import torch

    # One thread count for every competitor, so no backend wins by using more cores.
    settings = dataclasses.replace(settings, threads=settings.threads or torch.get_num_threads())
    torch.set_num_threads(settings.threads)
    suite = importlib.import_module(get_suite(settings.suite).module)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    output = suite.run(settings)
    machine["load_average_at_end"] = os.getloadavg()
    return BenchRun(settings, output, machine, library_versions(), memory_peaks(), created)
