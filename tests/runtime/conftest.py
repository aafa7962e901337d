"""Active tiny-preset runners, opened once per session on the shared tiny export."""

import pytest
import torch

from vgrt.engines import open_runner


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny UNet gains nothing from a second thread, and on a busy 2-core machine OpenMP threads
    waiting on each other made a torch call 50x slower (1.1 s instead of 22 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def runners(tiny_export):
    """{'torch': runner, 'onnxruntime': runner} on the plain tiny UNet (fp32), both active."""
    directory = tiny_export(features="none")
    opened = {backend: open_runner(directory, backend=backend).activate() for backend in ("torch", "onnxruntime")}
    yield opened
    for runner in opened.values():
        runner.deactivate()
