"""A function run in a child process of its own: its value comes back, and so does every way it can fail."""

import os
import re
import signal
import time

import pytest

from vgrt.bench import child
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


def sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


class HangsOnArrival:
    """An argument whose unpickling in the child sleeps for 10 minutes: a child that hangs before it starts
    its function, as one forked while the server's import lock was held."""

    def __reduce__(self):
        return time.sleep, (600,)


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


def test_a_child_that_does_not_start_is_stopped_and_named(monkeypatch):
    run_in_child(pid_and_sum, what="a warm-up")  # the fork server starts (and imports torch) outside the timing
    monkeypatch.setattr(child, "START_TIMEOUT_S", 2.0)
    started = time.perf_counter()
    with pytest.raises(VgrtError) as raised:
        run_in_child(pid_and_sum, HangsOnArrival(), what="a stuck start")
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert re.match(r"a stuck start: its child process \(pid \d+\) had not started after 2 s", message)
    assert "so it was stopped" in message and "rerun" in message and "py-spy dump --pid N" in message
    pid = int(re.search(r"pid (\d+)", message).group(1))
    with pytest.raises(ProcessLookupError):  # killed and reaped: nothing left behind
        os.kill(pid, 0)


def test_work_that_outlasts_the_start_timeout_is_not_cut_short(monkeypatch):
    monkeypatch.setattr(child, "START_TIMEOUT_S", 2.0)
    assert run_in_child(sleep_then_return, 4.0, what="long work") == "done"
