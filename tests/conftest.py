"""Shared fixtures: tiny-preset exports and composers are made once per test session and reused."""

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from vgrt._lazy import is_available

# Without a GPU, Triton kernels run in its CPU interpreter. The variable must be set before anything
# imports triton, and test modules collected early (export, runtime) import it indirectly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

logging.getLogger("vgrt").setLevel(logging.WARNING)

# Tests send traffic to loopback only: openvino, which some tests import directly, is imported first the
# way vgrt imports it, without its telemetry (vgrt._lazy).
is_available("openvino")

SKIP_SLOW_REASON = "slow: set VGRT_RUN_SLOW=1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` (minutes of CPU time) run only when VGRT_RUN_SLOW=1."""
    if os.environ.get("VGRT_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason=SKIP_SLOW_REASON)
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
    waiting on each other made a tiny torch UNet call 50x slower (1.1 s instead of 22 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def each_model_traced_once():
    """Tracing is the minute of an export on a 2-core CPU, and a module, spec and opset trace to one graph
    whatever is done to it afterwards (attention forms, a cache's file layout): the exports made in this
    process trace each model once and run their passes on a copy."""
    import json

    import onnx

    from vgrt.export import exporter
    from vgrt.models.weights import model_sha256

    trace = exporter.trace_to_onnx
    traced: dict[tuple, onnx.ModelProto] = {}

    def traced_once(module, spec, opset):
        processors = [type(getattr(m, "processor", None)).__qualname__ for m in module.modules()]
        key = (model_sha256(module), json.dumps(spec.to_json(), sort_keys=True), opset, repr(processors))
        if key not in traced:
            traced[key] = trace(module, spec, opset)
        copy = onnx.ModelProto()
        copy.CopyFrom(traced[key])
        return copy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "trace_to_onnx", traced_once)
        yield


@pytest.fixture(scope="session")
def composer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vgrt-cache")


@pytest.fixture(scope="session")
def tiny_export(composer_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_export(features=..., dtype=..., attention_form=..., opset=...) -> exported directory. Each export
    (about a minute of tracing on a 2-core CPU) is made once, as an entry of the session's export cache that
    the composers running the same UNet share; tests get a hard-linked copy without the engines the
    composers compile into the entry."""
    from tests.exports import copy_export
    from vgrt.export.cache import cached_export
    from vgrt.export.exporter import ExportSettings

    copies = tmp_path_factory.mktemp("exports")

    def get(**settings: object) -> Path:
        entry = cached_export(ExportSettings(preset="tiny", **settings), composer_cache)
        copy = copies / entry.name
        if not copy.exists():
            copy_export(entry, copy, copy_function=os.link)
        return copy

    return get


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    """The example inputs `vgrt examples` draws, at 32x32 (tiny's smallest usable size)."""
    from vgrt.runtime.examples import write_examples

    directory = tmp_path_factory.mktemp("examples")
    write_examples(directory, size=32)
    return directory


# One OpenVINO thread, for the reason one_torch_thread gives; its compiled models live in the shared cache.
RUNNER_OPTIONS = {"openvino": {"threads": 1}}


def composers_of(preset: str, cache) -> Iterator[Callable]:
    """For fixtures: get(backend) -> a Composer of `preset` on `backend`, made once; all closed at teardown."""
    from vgrt.runtime.composer import Composer

    made = {}

    def get(backend: str) -> Composer:
        if backend not in made:
            made[backend] = Composer.from_preset(
                preset, backend=backend, cache=cache, progress=False, runner_options=RUNNER_OPTIONS.get(backend, {})
            )
        return made[backend]

    yield get
    for composer in made.values():
        composer.close()


@pytest.fixture(scope="session")
def composers(composer_cache):
    """composers(backend) -> a tiny-preset Composer on `backend` (torch, onnxruntime, openvino), one per session."""
    yield from composers_of("tiny", composer_cache)


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if an image is decoded or a Composer made: the refusal must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the check")

    monkeypatch.setattr("vgrt.runtime.images.load_image", forbidden)
    monkeypatch.setattr("vgrt.runtime.composer.Composer.__post_init__", forbidden)
