"""vgrt imports openvino without its telemetry: no usage event, no background thread (which, importing while
the benchmarks' fork server forked, left a child waiting forever on an import lock)."""

import subprocess
import sys

import pytest

from vgrt._lazy import is_available

pytestmark = pytest.mark.skipif(not is_available("openvino"), reason="openvino is not installed")

IMPORT = """
import sys, threading
{how}
from openvino.tools.ovc import telemetry_utils
print(telemetry_utils.tm.__name__)
print(sorted(t.name for t in threading.enumerate()))
import openvino_telemetry  # hidden only while openvino imports
print(openvino_telemetry.__name__)
"""


def _imported(how: str) -> list[str]:
    """What a fresh interpreter reports after importing openvino `how`: telemetry module, threads, package."""
    found = subprocess.run(
        [sys.executable, "-c", IMPORT.format(how=how)], capture_output=True, text=True, timeout=120, check=True
    )
    return found.stdout.splitlines()


@pytest.mark.parametrize(
    "how",
    [
        "from vgrt._lazy import require; require('openvino')",
        "from vgrt._lazy import is_available; assert is_available('openvino')",
        "from vgrt.doctor import _import; assert _import('openvino')[0] is not None",
    ],
)
def test_vgrt_imports_openvino_with_its_no_op_telemetry(how):
    stub, threads, package = _imported(how)
    assert stub == "openvino.tools.ovc.telemetry_stub"
    assert threads == "['MainThread']"
    assert package == "openvino_telemetry"
