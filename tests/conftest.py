"""Shared fixtures: tiny-preset exports are made once per test session and reused."""

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

logging.getLogger("vgrt").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_export(features=..., dtype=..., attention_form=..., opset=...) -> exported directory (cached)."""
    from vgrt.export.exporter import ExportSettings, export

    made: dict[tuple, Path] = {}

    def get(**settings: object) -> Path:
        key = tuple(sorted(settings.items()))
        if key not in made:
            name = "-".join(f"{k}={v}" for k, v in key).replace(",", "+") or "plain"
            made[key] = export(tmp_path_factory.mktemp("exports") / name, ExportSettings(preset="tiny", **settings))
        return made[key]

    return get
