"""Run one method once, for a few steps at the preset's smallest image size, in a fresh process, so that
every engine it uses is in the export cache before `vgrt bench compose` opens it.

The benchmark process then only opens engines: no first-use export is timed, and the export's peak
memory (several GB per SD 1.5 feature set) stays out of the benchmark's. Whatever a method exports is
covered, as the method itself asks for it; exports do not depend on the image size, so the smallest
keeps this run short and light. One process per method, so one method's leftovers never add to the
next one's export. With calibrated folders (an int8 competitor's), the method runs their INT8 UNets
in place of the UNets of their features, and the other components from the normal exports (OpenVINO
compiles the INT8 UNet into its cache here too). The child prints one JSON line: its seconds (mostly
export time on a cold cache).

    python -m vgrt.bench.compose_child PRESET BACKEND METHOD [CALIBRATED_DIR ...]
"""

import json
import sys
from pathlib import Path

from vgrt.bench.export_child import run_child

STEPS = 2  # the fewest every method takes (AIComposer inverts one step and samples one)


def prepare_in_child(preset: str, backend: str, method: str, calibrated: tuple[Path, ...] = ()) -> float:
    """Export (where the cache lacks them) the engines `method` uses on `preset`, in a child process."""
    what = f"preparing {method} on {preset} ({backend}{', int8' if calibrated else ''})"
    return run_child(__name__, [preset, backend, method, *map(str, calibrated)], what)["seconds"]


def _main(preset: str, backend: str, method: str, *calibrated: str) -> None:
    import time

    from vgrt.bench.compose_int8 import composer_options
    from vgrt.bench.compose_methods import bench_request, example_images
    from vgrt.models.presets import get_preset
    from vgrt.runtime.composer import Composer
    from vgrt.runtime.methods.registry import Work

    model = get_preset(preset)
    with example_images(model, model.profile.latent.min * model.vae_factor) as examples:
        compose, request = bench_request(method, examples, Work(STEPS, gradient_steps=1))
    options = composer_options(backend, calibrated) if calibrated else {}
    started = time.perf_counter()
    with Composer.from_preset(preset, backend=backend, progress=False, **options) as composer:
        compose(composer, request)
    print(json.dumps({"seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
