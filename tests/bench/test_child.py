"""A function run in a child process of its own: its value comes back, and so does every way it can fail."""

import os
import signal

import pytest

from vgrt.bench.child import run_in_child
from vgrt.errors import InvalidInputError, VgrtError


def pid_and_sum(*values: int) -> tuple[int, int]:
    return os.getpid(), sum(values)


def refuse(value: str) -> None:
    raise InvalidInputError(f"bad value {value!r}")


def crash() -> None:
    raise RuntimeError("a bug in the child")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a process


def test_the_value_comes_back_from_another_process():
    pid, total = run_in_child(pid_and_sum, 1, 2, 3, what="a sum")
    assert total == 6 and pid != os.getpid()


def test_a_vgrt_error_is_raised_as_it_was():
    with pytest.raises(InvalidInputError, match="bad value 'x'"):
        run_in_child(refuse, "x", what="a refusal")


def test_any_other_failure_names_what_failed_with_the_end_of_its_traceback():
    with pytest.raises(VgrtError, match="a crash failed in its child process:(.|\n)*RuntimeError: a bug in the child"):
        run_in_child(crash, what="a crash")


def test_a_child_killed_before_it_reports_says_how_it_ended():
    with pytest.raises(VgrtError, match=r"a death: its child process ended \(exit code -9\) before reporting"):
        run_in_child(die, what="a death")
