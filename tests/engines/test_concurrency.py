"""One runner, many threads: concurrent calls return exactly the serial results on every backend; the
per-call context pool behind that; runner lifecycle under threads; a Composer shared by threads."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vgrt.engines import open_runner
from vgrt.engines.base import Runner
from vgrt.engines.contexts import ContextPool
from vgrt.errors import InvalidInputError, VgrtError
from vgrt.export.feeds import random_feed
from vgrt.export.spec import ComponentSpec, TensorSpec

THREADS, CALLS = 4, 10


# --- the pool ---------------------------------------------------------------------------------------


class Maker:
    """make() for a pool: numbered contexts, counted; fails when told to."""

    def __init__(self) -> None:
        self.made: list[dict] = []
        self.fail = False

    def __call__(self) -> dict:
        if self.fail:
            raise RuntimeError("cannot make a context")
        self.made.append({"number": len(self.made)})
        return self.made[-1]


def test_a_lone_caller_gets_its_context_back_every_call():
    make = Maker()
    pool = ContextPool(make)
    seen = []
    for _ in range(5):
        with pool.acquire() as context:
            seen.append(context)
    assert len(make.made) == 1 and all(context is make.made[0] for context in seen)


def test_overlapping_callers_get_their_own_contexts_up_to_the_limit_then_wait():
    pool = ContextPool(Maker(), limit=2)
    with pool.acquire() as first, pool.acquire() as second:
        assert first is not second and pool.made == 2
        third = _acquire_in_thread(pool)
        assert not third.taken.wait(0.2), "a third caller must wait while both contexts are in use"
    assert third.taken.wait(5) and third.context in (first, second) and pool.made == 2
    third.release.set()


def test_no_limit_makes_one_context_per_overlapping_call():
    pool = ContextPool(Maker())
    with pool.acquire(), pool.acquire(), pool.acquire():
        assert pool.made == 3


def test_a_call_that_raises_returns_its_context():
    make = Maker()
    pool = ContextPool(make, limit=1)
    with pytest.raises(ValueError, match="inside the call"), pool.acquire():
        raise ValueError("inside the call")
    with pool.acquire() as context:  # would wait forever if the failed call had kept it
        assert context is make.made[0]


def test_a_failed_make_frees_its_place():
    make = Maker()
    pool = ContextPool(make, limit=1)
    make.fail = True
    with pytest.raises(RuntimeError, match="cannot make a context"), pool.acquire():
        pass
    make.fail = False
    with pool.acquire() as context:
        assert context is make.made[0] and pool.made == 1


def test_clear_drops_idle_contexts_now_and_busy_ones_when_they_come_back():
    make = Maker()
    pool = ContextPool(make, limit=2)
    with pool.acquire():
        pass  # context 0 is idle
    with pool.acquire() as busy:  # context 0 again, in use while the pool is cleared
        assert pool.clear() == [] and pool.made == 1
        with pool.acquire() as fresh:
            assert fresh is make.made[1]
    assert pool.made == 1  # context 0 came back after the clear and was dropped
    with pool.acquire() as context:
        assert context is make.made[1] and context is not busy
    assert pool.clear() == [make.made[1]] and pool.made == 0


def test_limit_below_one_is_refused():
    with pytest.raises(VgrtError, match="at least 1 .* got 0"):
        ContextPool(Maker(), limit=0)


class _Holder:
    def __init__(self) -> None:
        self.taken, self.release = threading.Event(), threading.Event()
        self.context = None


def _acquire_in_thread(pool: ContextPool) -> _Holder:
    holder = _Holder()

    def hold() -> None:
        with pool.acquire() as context:
            holder.context = context
            holder.taken.set()
            holder.release.wait(5)

    threading.Thread(target=hold, daemon=True).start()
    return holder


# --- real runners from several threads --------------------------------------------------------------


def _feeds(spec: ComponentSpec) -> list[dict[str, torch.Tensor]]:
    """THREADS * CALLS different feeds in two shapes that alternate within each thread (see _in_threads)
    and between threads, so output buffers change shape and change hands."""
    shapes = [spec.profile_sizes("min"), spec.profile_sizes("opt")]
    return [random_feed(spec, shapes[(i + i // THREADS) % 2], seed=i) for i in range(THREADS * CALLS)]


def _in_threads(runner: Runner, feeds: list[dict]) -> list[torch.Tensor]:
    """Every feed run once, by THREADS threads that start together; results in feed order."""
    start = threading.Barrier(THREADS)

    def work(first: int) -> list[tuple[int, torch.Tensor]]:
        start.wait()
        return [(i, runner.infer(feeds[i])["noise_pred"]) for i in range(first, len(feeds), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        done = [pair for part in pool.map(work, range(THREADS)) for pair in part]
    return [out for _, out in sorted(done, key=lambda pair: pair[0])]


def _wrong_calls(runner: Runner, feeds: list[dict]) -> list[int]:
    serial = [runner.infer(feed)["noise_pred"].clone() for feed in feeds]
    parallel = _in_threads(runner, feeds)
    return [i for i, (a, b) in enumerate(zip(serial, parallel)) if not torch.equal(a, b)]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_concurrent_calls_return_the_serial_results(tiny_export, backend):
    directory = tiny_export()
    with open_runner(directory, backend=backend) as runner:
        feeds = _feeds(runner.spec)
        assert _wrong_calls(runner, feeds) == []


def test_reused_outputs_serve_a_loop_across_shapes(tiny_export):
    """reuse_outputs=True is for one caller: each output is right when returned, and a call of the same
    shape as the one before writes into the same buffer."""
    directory = tiny_export()
    with open_runner(directory, backend="onnxruntime") as fresh, \
         open_runner(directory, backend="onnxruntime", reuse_outputs=True) as reusing:  # fmt: skip
        spec = fresh.spec
        sizes = [spec.profile_sizes("min")] * 2 + [spec.profile_sizes("opt")] * 2
        pointers = []
        for seed, shape in enumerate(sizes):
            feed = random_feed(spec, shape, seed=seed)
            out = reusing.infer(feed)["noise_pred"]
            assert torch.equal(out, fresh.infer(feed)["noise_pred"])
            pointers.append(out.data_ptr())
    assert pointers[0] == pointers[1] and pointers[2] == pointers[3]


# --- runner lifecycle under threads -----------------------------------------------------------------


class GatedRunner(Runner):
    """A runner whose calls wait for `proceed`; it records its lifecycle events in order."""

    def __init__(self) -> None:
        spec = ComponentSpec("gated", (TensorSpec("x", "float32", (1,)),), (TensorSpec("y", "float32", (1,)),), {})
        super().__init__(spec)
        self.proceed, self.entered = threading.Event(), threading.Event()
        self.events: list[str] = []

    def activate_impl(self) -> None:
        self.events.append("activate")

    def deactivate_impl(self) -> None:
        self.events.append("deactivate")

    def infer_impl(self, feed, sizes):
        self.entered.set()
        self.proceed.wait(5)
        self.events.append("call done")
        return {"y": feed["x"] + 1}


def test_deactivate_waits_for_calls_in_flight_and_refuses_new_ones():
    runner = GatedRunner().activate()
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(runner.infer, {"x": torch.zeros(1)})
        assert runner.entered.wait(5)
        closing = pool.submit(runner.deactivate)
        time.sleep(0.2)
        assert not closing.done(), "deactivate must wait for the call in flight"
        with pytest.raises(VgrtError, match="GatedRunner is not active: call activate"):
            runner.infer({"x": torch.zeros(1)})
        runner.proceed.set()
        assert torch.equal(call.result(5)["y"], torch.ones(1))
        closing.result(5)
    assert runner.events == ["activate", "call done", "deactivate"] and not runner.is_active


def test_racing_activations_activate_once():
    runner = GatedRunner()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda _: runner.activate(), range(THREADS)))
    runner.deactivate()
    assert runner.events == ["activate", "deactivate"]


# --- a Composer shared by threads -------------------------------------------------------------------


class OpenLog:
    """Stands in for the export and the runner opening of a Composer; counts them per component."""

    def __init__(self, tmp_path) -> None:
        self.directory, self.exports, self.hold = tmp_path, [], {}
        self.fail_next = False

    def cached_export(self, settings, root=None):
        gate = self.hold.get(settings.components)
        if gate is not None:
            gate.wait(5)
        time.sleep(0.05)  # a window in which a second thread would start its own export
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        self.exports.append(settings.components)
        return self.directory

    def open_runner(self, directory, component, backend, **options):
        return GatedRunner()


@pytest.fixture
def shared_composer(tmp_path, monkeypatch):
    from vgrt.engines import engine_set
    from vgrt.export import cache
    from vgrt.runtime import composer as composer_module

    log = OpenLog(tmp_path)
    monkeypatch.setattr(cache, "cached_export", log.cached_export)
    monkeypatch.setattr(engine_set, "open_runner", log.open_runner)
    composer = composer_module.Composer.from_preset("tiny", cache=tmp_path, progress=False)
    yield composer, log
    composer.close()


def test_threads_asking_for_one_runner_share_one_export_and_one_runner(shared_composer):
    composer, log = shared_composer
    with ThreadPoolExecutor(THREADS) as pool:
        runners = list(pool.map(lambda _: composer.runner("unet", "mutual"), range(THREADS)))
    assert all(runner is runners[0] for runner in runners) and runners[0].is_active
    assert log.exports == ["unet"]


def test_other_runners_open_while_one_is_being_exported(shared_composer):
    composer, log = shared_composer
    log.hold["unet"] = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        unet = pool.submit(composer.runner, "unet")
        encoder = pool.submit(composer.runner, "vae_decoder").result(5)  # not behind the UNet's export
        assert encoder.is_active and not unet.done()
        log.hold["unet"].set()
        assert unet.result(5).is_active


def test_a_failed_export_is_not_kept(shared_composer):
    composer, log = shared_composer
    log.fail_next = True
    with pytest.raises(OSError, match="disk full"):
        composer.runner("text_encoder")
    assert composer.runner("text_encoder").is_active and len(log.exports) == 1


def test_threads_asking_for_one_module_build_it_once(shared_composer, monkeypatch):
    from types import SimpleNamespace

    from vgrt.export import components

    composer, _ = shared_composer
    built = []

    def build(name, source, features, dtype):
        time.sleep(0.05)
        built.append(name)
        return SimpleNamespace(module=torch.nn.Linear(1, 1))

    monkeypatch.setattr(components, "build_component", build)
    with ThreadPoolExecutor(THREADS) as pool:
        modules = list(pool.map(lambda _: composer.module("unet"), range(THREADS)))
    assert all(module is modules[0] for module in modules) and built == ["unet"]
    assert not any(p.requires_grad for p in modules[0].parameters())


def test_close_deactivates_every_runner_once_and_later_use_reopens(shared_composer):
    composer, log = shared_composer
    first = composer.runner("unet")
    composer.close()
    composer.close()
    assert first.events == ["activate", "deactivate"]
    again = composer.runner("unet")
    assert again is not first and again.is_active and log.exports == ["unet", "unet"]


def test_two_threads_composing_get_the_serial_images(composers):
    from tests.runtime.methods.test_mca_ctrl import request
    from vgrt.runtime.methods import mca_ctrl

    composer = composers("onnxruntime")
    requests = [request(steps=3, seed=seed, prompt=prompt) for seed, prompt in ((1, "a dog"), (2, "a red cat"))]
    serial = [mca_ctrl.compose(composer, r) for r in requests * 2]
    with ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(lambda r: mca_ctrl.compose(composer, r), requests * 2))
    for alone, together in zip(serial, parallel):
        assert torch.equal(alone.latents, together.latents) and torch.equal(alone.image, together.image)


# --- the TensorRT runner's contexts, on stand-ins of TensorRT and CUDA ------------------------------
# The stand-in engine computes y = 2x + 1 from the buffers bound to its context, reading them by address,
# with a pause between reading and writing in which a shared buffer would be overwritten. A CUDA graph
# records the executions made while it captures and repeats them on replay.


class FakeDevice:
    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}  # device memory by address
        self.capturing = threading.local()
        self.lock = threading.Lock()
        self.running_on_shared, self.most_on_shared = 0, 0

    def empty(self, numel, dtype, device) -> torch.Tensor:
        tensor = torch.zeros(numel, dtype=dtype)
        self.tensors[tensor.data_ptr()] = tensor
        return tensor


class FakeContext:
    def __init__(self, device: FakeDevice, shared: bool) -> None:
        self.device, self.shared = device, shared
        self.addresses, self.memory = {}, None
        self.shape = None

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shape

    def set_device_memory(self, address, size):
        self.memory = address
        return True

    def execute_async_v3(self, stream):
        graph = getattr(self.device.capturing, "graph", None)
        if graph is not None:
            graph.work.append(self.run)
        else:
            self.run()
        return True

    def run(self) -> None:
        count = _numel(self.shape)
        x = self.device.tensors[self.addresses["x"]][:count].clone()
        if self.shared:
            with self.device.lock:
                self.device.running_on_shared += 1
                self.device.most_on_shared = max(self.device.most_on_shared, self.device.running_on_shared)
        time.sleep(0.002)
        self.device.tensors[self.addresses["y"]][:count] = 2 * x + 1
        if self.shared:
            with self.device.lock:
                self.device.running_on_shared -= 1


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


class FakeEngine:
    num_io_tensors = 2
    device_memory_size_v2 = 64

    def __init__(self, device: FakeDevice) -> None:
        self.device, self.contexts = device, []

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self, strategy=None):
        self.contexts.append(FakeContext(self.device, shared=strategy == "user managed"))
        return self.contexts[-1]


class FakeGraph:
    def __init__(self) -> None:
        self.work = []

    def replay(self) -> None:
        for run in self.work:
            run()


class FakeStream:
    cuda_stream = 0

    def __init__(self, device=None) -> None:
        pass

    def wait_stream(self, other) -> None: ...

    def wait_event(self, event) -> None: ...

    def synchronize(self) -> None: ...


class FakeEvent:
    def record(self, stream=None) -> None: ...

    def synchronize(self) -> None: ...


@pytest.fixture
def fake_gpu(monkeypatch):
    """TrtRunner's module with TensorRT and torch.cuda replaced by stand-ins; yields (module, device)."""
    from contextlib import contextmanager, nullcontext
    from types import SimpleNamespace

    from vgrt.engines.tensorrt import runner as runner_module

    device = FakeDevice()
    engines = []

    def deserialize(data):
        engines.append(FakeEngine(device))
        return engines[-1]

    trt = SimpleNamespace(
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=deserialize),
        ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user managed"),
        float32="float32", float16="float16", bfloat16="bfloat16", int64="int64", int32="int32", int8="int8",
        bool="bool",
    )  # fmt: skip

    @contextmanager
    def capture(graph, stream=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local", "a capture must not fail because another thread runs"
        device.capturing.graph = graph
        try:
            yield
        finally:
            device.capturing.graph = None

    monkeypatch.setattr(runner_module, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(runner_module, "logger", lambda: None)
    monkeypatch.setattr(runner_module, "_device_tensor", device.empty)
    for name, value in {
        "is_available": lambda: True, "device": lambda index: nullcontext(), "stream": lambda s: nullcontext(),
        "Stream": FakeStream, "Event": FakeEvent, "current_stream": lambda device=None: FakeStream(),
        "CUDAGraph": FakeGraph, "graph": capture,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)
    yield runner_module, device, engines


def _toy_spec() -> ComponentSpec:
    from vgrt.models.presets import Range

    x, y = (TensorSpec(name, "float32", ("batch", 4)) for name in ("x", "y"))
    return ComponentSpec("toy", (x,), (y,), {"batch": Range(1, 2, 4)})


def _toy_feeds() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(1 + (i + i // THREADS) % 2, 4, generator=generator)} for i in range(THREADS * CALLS)]


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_tensorrt_calls_from_threads_each_hold_their_own_context(fake_gpu, cuda_graph):
    runner_module, _, engines = fake_gpu
    settings = runner_module.TrtSettings(cuda_graph=cuda_graph, max_contexts=2)
    feeds = _toy_feeds()
    with runner_module.TrtRunner(lambda: b"engine", _toy_spec(), settings) as runner:
        assert runner._calls.made == 1, "activation makes the first context"
        start = threading.Barrier(THREADS)

        def work(first: int) -> list[tuple[int, torch.Tensor]]:
            start.wait()
            return [(i, runner.infer(feeds[i])["y"]) for i in range(first, len(feeds), THREADS)]

        with ThreadPoolExecutor(THREADS) as pool:
            done = dict(pair for part in pool.map(work, range(THREADS)) for pair in part)
        assert runner._calls.made == 2
    contexts = engines[0].contexts
    assert len(contexts) == 2 and contexts[0].addresses["x"] != contexts[1].addresses["x"]
    assert all(torch.equal(done[i], 2 * feed["x"] + 1) for i, feed in enumerate(feeds))


def test_tensorrt_runners_sharing_memory_never_run_at_once(fake_gpu):
    runner_module, device, engines = fake_gpu
    shared = runner_module.SharedDeviceMemory()
    settings = runner_module.TrtSettings(max_contexts=2)
    feeds = _toy_feeds()
    with runner_module.TrtRunner(lambda: b"a", _toy_spec(), settings, shared) as first, \
         runner_module.TrtRunner(lambda: b"b", _toy_spec(), settings, shared) as second:  # fmt: skip
        runners = (first, second)
        with ThreadPoolExecutor(THREADS) as pool:
            done = list(pool.map(lambda i: runners[i % 2].infer(feeds[i])["y"], range(len(feeds))))
    assert all(torch.equal(out, 2 * feed["x"] + 1) for out, feed in zip(done, feeds))
    assert device.most_on_shared == 1
    contexts = [context for engine in engines for context in engine.contexts]
    assert len(contexts) >= 3 and {context.memory for context in contexts} == {shared.buffer.data_ptr()}


def test_tensorrt_context_limit_below_one_is_refused(fake_gpu):
    runner_module, _, _ = fake_gpu
    with pytest.raises(InvalidInputError, match="max_contexts must be at least 1, got 0"):
        runner_module.TrtRunner(lambda: b"", _toy_spec(), runner_module.TrtSettings(max_contexts=0))
