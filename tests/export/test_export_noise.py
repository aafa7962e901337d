"""Export keeps library chatter off the terminal: torch.onnx's known-harmless warnings and log lines are
dropped where they arise, any other warning becomes one vgrt log line, and -v (DEBUG) shows them all."""

import logging
import warnings

import pytest

from vgrt import library_noise

HARMLESS = [
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()` instead.", FutureWarning),
    ("# The axis name: batch will not be used, since it shares the same shape constraints with another axis: batch.",
     UserWarning),
]  # fmt: skip


def warn_like_torch_onnx() -> None:
    for message, category in HARMLESS:
        warnings.warn(message, category)
    logging.getLogger("torch.onnx._internal.exporter._registration").warning(
        "torchvision is not installed. Skipping torchvision::nms"
    )
    warnings.warn("Constant folding kept a data-dependent shape\nsecond line of detail", UserWarning)


def test_harmless_warnings_are_dropped_and_others_translated(caplog, capfd):
    with caplog.at_level(logging.INFO, logger="vgrt"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the exporter would fail the test
        with library_noise.torch_onnx_warnings_translated("unet"):
            warn_like_torch_onnx()
    assert [r.getMessage() for r in caplog.records] == [
        "torch.onnx warned while exporting unet: Constant folding kept a data-dependent shape"
    ]
    assert capfd.readouterr().err == ""
    assert logging.getLogger("torch.onnx").handlers and all(  # torch's own handler is back in place
        not isinstance(h, library_noise._Collector) for h in logging.getLogger("torch.onnx").handlers
    )


def test_verbose_shows_library_warnings_as_they_arise(caplog):
    translated = library_noise.torch_onnx_warnings_translated("unet")
    with caplog.at_level(logging.DEBUG, logger="vgrt"), pytest.warns(UserWarning) as caught, translated:
        warn_like_torch_onnx()
    assert len(caught) == 3 and not [r for r in caplog.records if r.name.startswith("vgrt")]
