"""The TensorRT runner's CUDA graphs and shared activation memory, without a GPU or TensorRT: a stand-in
of the documented TensorRT runtime API (engine, execution context) and of torch's CUDA streams and graphs.

The stand-in context "executes" out = 2 * sample + shift, reading its bound input buffer at run time, so
a replayed graph computes on the inputs of the call that replays it, as a real one does.
"""

import sys
import types
from contextlib import contextmanager

import pytest
import torch

from vgrt.engines.tensorrt import library, runner
from vgrt.engines.tensorrt.runner import SharedDeviceMemory, TrtRunner, TrtSettings, shape_key
from vgrt.errors import InvalidInputError
from vgrt.export.spec import ComponentSpec, TensorSpec
from vgrt.models.presets import Range

SPEC = ComponentSpec(
    "unet",
    inputs=(TensorSpec("sample", "float32", ("batch", 4)),),
    outputs=(TensorSpec("noise_pred", "float32", ("batch", 4)),),
    dims={"batch": Range(1, 2, 4)},
)


class Recorder:
    """What the stand-ins saw: executions run, graphs captured and replayed, device syncs."""

    def __init__(self):
        self.executed, self.captured, self.replayed, self.syncs = 0, 0, 0, 0
        self.capturing = None  # the graph being captured


class FakeContext:
    def __init__(self, recorder: Recorder, shift: float):
        self.recorder, self.shift = recorder, shift
        self.addresses, self.shapes, self.memory = {}, {}, None

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return shape[0] <= 4

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_device_memory(self, address, size):
        self.memory = (address, size)

    def execute_async_v3(self, stream_handle):
        work = self._work(dict(self.shapes))
        if self.recorder.capturing is not None:
            self.recorder.capturing.work.append(work)  # recorded into the graph, not run
        else:
            work()
        return True

    def _work(self, shapes):
        def run():
            self.recorder.executed += 1
            numel = shapes["sample"][0] * 4
            sample, out = (_tensor_at(self.addresses[n], numel) for n in ("sample", "noise_pred"))
            out.copy_(2 * sample + self.shift)

        return run


_BUFFERS: dict[int, torch.Tensor] = {}  # data_ptr -> the CPU "device" buffer the runner allocated


def _tensor_at(address, numel):
    return _BUFFERS[address][:numel]


class FakeEngine:
    def __init__(self, recorder, memory_size, shift):
        self.recorder, self.device_memory_size_v2, self.shift = recorder, memory_size, shift
        self.num_io_tensors, self.strategies = 2, []

    def get_tensor_name(self, i):
        return ("sample", "noise_pred")[i]

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def create_execution_context(self, strategy=None):
        self.strategies.append(strategy)
        return FakeContext(self.recorder, self.shift)


class FakeGraph:
    def __init__(self, recorder):
        self.recorder, self.work = recorder, []

    def replay(self):
        self.recorder.replayed += 1
        for work in self.work:
            work()


class FakeStream:
    cuda_stream = 0

    def __init__(self, *args):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


class FakeEvent:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda and tensorrt stand-ins; yields the recorder and a factory of engines."""
    recorder = Recorder()
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.bfloat16, trt.int64, trt.int32, trt.int8, trt.bool = (
        "FLOAT", "HALF", "BF16", "INT64", "INT32", "INT8", "BOOL",
    )  # fmt: skip
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    engines = {}
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: engines[blob])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    library.logger.cache_clear()

    @contextmanager
    def capture(graph, stream=None, capture_error_mode=None):
        recorder.syncs += 1  # torch.cuda.graph synchronises the device on entry
        recorder.capturing = graph
        yield
        recorder.capturing = None
        recorder.captured += 1

    def device_tensor(numel, dtype, device):
        tensor = torch.zeros(numel, dtype=dtype)
        _BUFFERS[tensor.data_ptr()] = tensor
        return tensor

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device", lambda index: contextmanager(lambda: (yield))())
    monkeypatch.setattr(cuda, "stream", lambda stream: contextmanager(lambda: (yield))())
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(cuda, "CUDAGraph", lambda: FakeGraph(recorder))
    monkeypatch.setattr(cuda, "graph", capture)
    monkeypatch.setattr(runner, "_device_tensor", device_tensor)

    def engine(name, memory_size=1024, shift=0.0):
        engines[name] = FakeEngine(recorder, memory_size, shift)
        return lambda: name

    yield recorder, engine, engines
    library.logger.cache_clear()


def _feed(batch, value):
    return {"sample": torch.full((batch, 4), float(value))}


def test_one_graph_per_call_shape_captured_on_its_first_call_and_replayed_after(fake_cuda):
    recorder, engine, _ = fake_cuda
    with TrtRunner(engine("unet"), SPEC, TrtSettings(cuda_graph=True)) as trt:
        assert trt.device == torch.device("cuda", 0)
        first = trt.infer(_feed(2, 1))["noise_pred"]
        assert (recorder.executed, recorder.captured, recorder.replayed) == (1, 1, 0)
        assert torch.equal(first, torch.full((2, 4), 2.0))  # the normal execution's result
        for step in range(2, 6):  # a step loop at one shape: replays only, no more syncs
            out = trt.infer(_feed(2, step))["noise_pred"]
            assert torch.equal(out, torch.full((2, 4), 2.0 * step))  # the graph read this call's inputs
        assert (recorder.executed, recorder.captured, recorder.replayed, recorder.syncs) == (5, 1, 4, 1)

        other = trt.infer(_feed(4, 3))["noise_pred"]  # a second shape: its own graph
        assert other.shape == (4, 4) and torch.equal(other, torch.full((4, 4), 6.0))
        assert (recorder.captured, recorder.replayed) == (2, 4)
        back = trt.infer(_feed(2, 7))["noise_pred"]  # the first shape's graph is still there
        assert torch.equal(back, torch.full((2, 4), 14.0))
        assert (recorder.captured, recorder.replayed) == (2, 5)
        (call,) = trt._calls.clear()
        assert set(call.graphs) == {shape_key({"sample": (2, 4)}), shape_key({"sample": (4, 4)})}


def test_without_cuda_graphs_every_call_executes(fake_cuda):
    recorder, engine, _ = fake_cuda
    with TrtRunner(engine("unet"), SPEC, TrtSettings(cuda_graph=False)) as trt:
        for step in range(3):
            assert torch.equal(trt.infer(_feed(2, step))["noise_pred"], torch.full((2, 4), 2.0 * step))
    assert (recorder.executed, recorder.captured, recorder.replayed, recorder.syncs) == (3, 0, 0, 0)


def test_runners_share_one_activation_buffer_and_recapture_when_it_grows(fake_cuda):
    recorder, engine, engines = fake_cuda
    memory = SharedDeviceMemory()
    settings = TrtSettings(cuda_graph=True)
    unet = TrtRunner(engine("unet", memory_size=1000), SPEC, settings, shared_memory=memory).activate()
    assert memory.buffer.numel() == 1000 and engines["unet"].strategies == ["user-managed"]
    unet.infer(_feed(2, 1))
    unet.infer(_feed(2, 1))
    assert (recorder.captured, recorder.replayed) == (1, 1)

    vae = TrtRunner(engine("vae", memory_size=3000, shift=1.0), SPEC, settings, shared_memory=memory).activate()
    assert memory.buffer.numel() == 3000 and memory.generation == 2
    assert torch.equal(vae.infer(_feed(2, 1))["noise_pred"], torch.full((2, 4), 3.0))
    # The UNet's graph holds the old buffer's address: it rebinds to the new one and captures again.
    assert torch.equal(unet.infer(_feed(2, 5))["noise_pred"], torch.full((2, 4), 10.0))
    (unet_call,) = unet._calls.clear()
    (vae_call,) = vae._calls.clear()
    address = (memory.buffer.data_ptr(), 3000)
    assert unet_call.context.memory == address and vae_call.context.memory == address
    assert recorder.captured == 3


def test_shared_memory_of_another_device_is_refused(fake_cuda):
    _, engine, _ = fake_cuda
    with pytest.raises(InvalidInputError, match="cuda:1 cannot serve a runner on cuda:0"):
        TrtRunner(engine("unet"), SPEC, TrtSettings(device=0), shared_memory=SharedDeviceMemory(device=1))
