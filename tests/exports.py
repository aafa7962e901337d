"""Copies of exports for tests that change or count what a folder holds."""

import shutil
from collections.abc import Callable
from pathlib import Path


def copy_export(source: Path, target: Path, copy_function: Callable = shutil.copy2) -> Path:
    """`target`: the export at `source` without the engines compiled into it (its `openvino/` and `tensorrt/`
    folders, which other tests' runners write there)."""
    return Path(
        shutil.copytree(
            source, target, copy_function=copy_function, ignore=shutil.ignore_patterns("openvino", "tensorrt")
        )
    )
