"""Export suite: time and peak memory of `vgrt export` per preset, feature set and precision.

Every sample is a fresh process (see export_child), so there is nothing to warm up: each sample is what
a user running `vgrt export` waits for, less the ~5 s of importing torch and the exporter.
"""

import itertools
import logging
import tempfile
from pathlib import Path

from vgrt.bench.export_child import export_in_child
from vgrt.bench.results import Case, Measurement, SuiteOutput
from vgrt.bench.settings import BenchSettings
from vgrt.export.exporter import ExportSettings

log = logging.getLogger(__name__)


def run(settings: BenchSettings) -> SuiteOutput:
    cases = []
    export_defaults = ExportSettings()
    for preset, features, dtype in itertools.product(settings.presets, settings.features, settings.dtypes):
        export_settings = ExportSettings(preset=preset, features=features, dtype=dtype)
        samples = []
        repeats = settings.timing.repeats
        for repeat in range(repeats):
            log.info("export %s (features %s, %s): %d of %d", preset, features, dtype, repeat + 1, repeats)
            with tempfile.TemporaryDirectory(prefix="vgrt-bench-export-") as tmp:
                samples.append(export_in_child(Path(tmp) / "unet", export_settings))
        seconds, peaks = tuple(s.seconds for s in samples), tuple(s.peak_rss_bytes for s in samples)
        measurement = Measurement("export", "torch.onnx (dynamo)", seconds, peak_rss_bytes=peaks)
        params = {"preset": preset, "features": features, "dtype": dtype}
        cases.append(Case(preset, f"{features}, {dtype}", params, (measurement,), baseline=None))
    details = {"opset": export_defaults.opset, "attention_form": export_defaults.attention_form}
    return SuiteOutput("+".join(settings.presets), tuple(cases), details)
