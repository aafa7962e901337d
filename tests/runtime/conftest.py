"""Active tiny-preset runners, opened once per session on the shared tiny export."""

import pytest

from vgrt.engines import open_runner


@pytest.fixture(scope="session")
def runners(tiny_export):
    """{'torch': runner, 'onnxruntime': runner} on the plain tiny UNet (fp32), both active."""
    directory = tiny_export(features="none")
    opened = {backend: open_runner(directory, backend=backend).activate() for backend in ("torch", "onnxruntime")}
    yield opened
    for runner in opened.values():
        runner.deactivate()
