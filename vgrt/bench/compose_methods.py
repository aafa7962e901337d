"""The requests `vgrt bench compose` times: the benchmarks of the method registry
(vgrt.runtime.methods.registry), each a method's inputs on the images of `vgrt examples` (a red disc
on a light background, sky over grass, their masks and a box), built as `vgrt compose` builds them.

To add a case, add a benchmark to its method's registry entry.
"""

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vgrt.models.presets import Preset
from vgrt.runtime.methods.registry import BENCHMARKS, Examples, Work

Compose = Callable[[Any, Any], Any]  # (Composer, request) -> Composition

METHODS = tuple(BENCHMARKS)  # the names --methods takes: the methods as `vgrt compose` spells them, and variants


@contextmanager
def example_images(preset: Preset, size: int) -> Iterator[Examples]:
    """The example images at `size` x `size`, in a folder that lasts while the context is open."""
    from vgrt.runtime.examples import write_examples

    with tempfile.TemporaryDirectory(prefix="vgrt-bench-inputs-") as tmp:
        write_examples(tmp, size)
        yield Examples(Path(tmp), size, preset)


def bench_request(name: str, examples: Examples, work: Work) -> tuple[Compose, Any]:
    """The compose function and the validated request of the benchmark `name` on `examples`."""
    method, values = BENCHMARKS[name]
    return method.compose, method.request(values(examples, work), examples.preset)


def gradient_steps(request: Any) -> dict[str, int]:
    """The PyTorch gradient stages a request runs, with their step counts: 'pno' (its iterations) for
    VCF with PNO, 'guidance' (its steps) for visual prompts; empty for the methods without gradients."""
    pno = getattr(request, "pno", None)
    counts = {"pno": pno.iterations} if pno is not None else {}
    if getattr(request, "guidance_steps", 0):
        counts["guidance"] = request.guidance_steps
    return counts
