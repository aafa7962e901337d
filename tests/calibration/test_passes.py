"""The quantisation's progress bar counts the passes that run: planned passes that are skipped leave its total."""

from contextlib import contextmanager
from pathlib import Path

import pytest

from vgrt.calibration import int8
from vgrt.calibration.int8 import Int8Settings, Passes, fallback_passes, quantise_with_fallback


@pytest.fixture
def measured(monkeypatch):
    """Stub the measuring passes: layer 'low' at 25 dB on the first measure, `after_smoothing` after it."""
    state = {"after_smoothing": 40.0, "measures": 0}

    def sqnr(model, target, held, by_output=frozenset()):
        state["measures"] += 1
        return {"low": 25.0 if state["measures"] == 1 else state["after_smoothing"], "high": 40.0}

    @contextmanager
    def smoothed(source, low, feeds, alphas):
        yield Path("smoothed.onnx"), {name: alphas[0] for name in low}

    monkeypatch.setattr(int8, "layer_sqnr_db", sqnr)
    monkeypatch.setattr(int8, "smoothed_model", smoothed)
    monkeypatch.setattr(int8, "relative_output_error", lambda *args, **kwargs: 0.01)
    return state


def _run(settings: Int8Settings, finish: bool) -> tuple[Passes, list[tuple[str, list[str]]]]:
    quantised = []
    smoothing = bool(settings.smoothquant_alphas)
    passes = Passes(fallback_passes(smoothing, finish), enabled=False)
    quantise_with_fallback(
        lambda model, float_layers: quantised.append((str(model), list(float_layers))),
        Path("fp32.onnx"), Path("int8.onnx"), [{}], settings, calib=[{}],
        finish=(lambda target: None) if finish else None, passes=passes,
    )  # fmt: skip
    return passes, quantised


@pytest.mark.parametrize("finish", [False, True])
def test_a_layer_below_the_threshold_costs_one_more_quantisation(measured, finish):
    passes, quantised = _run(Int8Settings(30.0), finish)
    assert quantised == [("fp32.onnx", []), ("fp32.onnx", ["low"])]
    assert len(passes.ran) == passes.total == 4 + finish


def test_no_layer_below_the_threshold_skips_the_fallback_pass(measured):
    passes, quantised = _run(Int8Settings(20.0), finish=False)
    assert quantised == [("fp32.onnx", [])]
    assert passes.ran == ["quantise", "per-layer SQNR", "held-out error"]
    assert passes.total == 3


@pytest.mark.parametrize(("after_smoothing", "expected_passes"), [(40.0, 6), (25.0, 7)])
def test_smoothing_runs_its_three_passes_and_the_fallback_only_when_still_low(
    measured, after_smoothing, expected_passes
):
    measured["after_smoothing"] = after_smoothing
    passes, quantised = _run(Int8Settings(30.0, smoothquant_alphas=(0.5,)), finish=False)
    assert [model for model, _ in quantised] == ["fp32.onnx", "smoothed.onnx"] + ["smoothed.onnx"] * (
        after_smoothing < 30
    )
    assert len(passes.ran) == passes.total == expected_passes
    assert "SmoothQuant (1 below threshold)" in passes.ran


def test_smoothing_planned_but_nothing_low_skips_its_passes(measured):
    passes, _ = _run(Int8Settings(20.0, smoothquant_alphas=(0.5,)), finish=False)
    assert len(passes.ran) == passes.total == 3
