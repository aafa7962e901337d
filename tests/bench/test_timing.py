"""The harness: warm-up calls are not timed, rounds alternate the competitors, outputs are compared."""

import pytest
import torch

from vgrt.bench.results import Case, Measurement
from vgrt.bench.settings import TimingSettings
from vgrt.bench.timing import Competitor, measure


def test_warmup_is_untimed_and_rounds_alternate_the_starting_competitor():
    calls = []

    def competitor(name: str, value: float) -> Competitor:
        return Competitor(name, "fake", lambda: calls.append(name) or torch.full((2,), value))

    measurements = measure([competitor("torch", 1.0), competitor("other", 1.5)], TimingSettings(warmup=2, repeats=3))

    assert calls == ["torch", "other", "other", "torch"] + ["torch", "other", "other", "torch", "torch", "other"]
    assert [len(m.samples_s) for m in measurements] == [3, 3]
    assert [m.max_abs_diff for m in measurements] == [None, 0.5]


def test_median_p90_and_ratio_to_the_baseline():
    torch_eager = Measurement("torch", "torch", (1.0, 2.0, 3.0, 4.0, 100.0))
    other = Measurement("other", "onnxruntime", (0.5, 1.5, 1.5))
    case = Case("group", "label", {}, (torch_eager, other))

    assert torch_eager.median_s == 3.0 and torch_eager.p90_s == pytest.approx(61.6)
    assert case.ratio(torch_eager) == 1.0 and case.ratio(other) == 0.5
    assert Case("group", "label", {}, (other,), baseline=None).ratio(other) is None
