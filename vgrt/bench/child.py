"""Run one function in a fresh process of its own and return what it returns.

The processes are forked from a server that imported torch once (multiprocessing's forkserver), so a
child starts in a fraction of a second where `python -m` pays the ~5 s import of torch every time, and
starts clean: the server has run nothing, so no OpenMP or OpenVINO thread pool and no CUDA context is
inherited half-initialised, and nothing the benchmark process holds (feeds, outputs, other engines) is in
the child's memory. A child's peak resident memory is therefore its own work plus the imported
libraries, as in a process started from scratch (`baseline_rss_bytes` measures what the imports hold).

Where CUDA is available the children are spawned instead (a fresh interpreter each, seconds more per
child): CUDA does not survive a fork once initialised, and nothing here proves that no preloaded module
ever initialises it.

A child reports that it started before it runs anything, and the parent waits only so long for that
(START_TIMEOUT_S): a child that hangs on its way in is stopped and named, where the work after the start
(many minutes for SD 1.5) is never cut short.
"""

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

from vgrt.errors import VgrtError

# A child starts in under a second from the fork server, in seconds when spawned (a fresh interpreter imports
# torch), several times that on a loaded machine; one not started after 2 minutes waits for something that
# never comes: a lock a thread of the server held at the fork (an import lock hung `vgrt bench unet` 20 min).
START_TIMEOUT_S = 120.0

# Imported once by the fork server (a module not installed is left out); whatever else a child needs is
# imported when it runs. Rebuilding a PyTorch UNet imports diffusers, seconds on every turn otherwise.
# Not openvino (0.1 s): imported here, it started a telemetry thread in the server, and a child forked while
# that thread was importing waited forever on the import lock it held (vgrt._lazy imports it without).
_PRELOAD = [
    "torch", "vgrt.bench.unet_child", "vgrt.models.rebuild", "vgrt.models.encoders", "vgrt.export.components",
    "vgrt.engines.ort_runner", "vgrt.engines.openvino_runner", "onnxruntime",
]  # fmt: skip


def run_in_child(function: Callable[..., Any], *args: Any, what: str) -> Any:
    """`function(*args)` in a fresh process; its return value (picklable) comes back. A VgrtError it raises
    is raised here as it was; any other failure, a child that dies without reporting (killed for memory),
    or one that has not started `function` within START_TIMEOUT_S (then stopped) raises VgrtError naming `what`."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_report, args=(sender, function, args), name=f"vgrt {what}")
    process.start()
    sender.close()  # the child holds the only write end: its exit ends recv() with EOFError
    try:
        if not receiver.poll(START_TIMEOUT_S):  # the start report, or the end of the pipe of a child that died
            process.kill()
            raise VgrtError(_not_started(what, process.pid))
        status, value = receiver.recv()
        if status == "started":
            status, value = receiver.recv()  # unbounded: the work itself may take many minutes
    except EOFError:
        status, value = "died", None
    finally:
        receiver.close()
        process.join()
    if status == "ok":
        return value
    if status == "raised":
        raise value
    if status == "failed":
        raise VgrtError(f"{what} failed in its child process:\n{value}")
    raise VgrtError(
        f"{what}: its child process ended (exit code {process.exitcode}) before reporting; a negative code is the "
        "signal that ended it, -9 most often the out-of-memory killer: check `free -g` and time fewer or smaller "
        "models at once"
    )


def _not_started(what: str, pid: int) -> str:
    return (
        f"{what}: its child process (pid {pid}) had not started after {START_TIMEOUT_S:g} s "
        "(vgrt.bench.child.START_TIMEOUT_S), so it was stopped; a child that hangs on its way in most often waits on "
        "a lock held when it was forked, which a rerun seldom meets: rerun, and if a child hangs again, see where "
        "with `py-spy dump --pid N` on it while it waits (a child of the fork server, or of this process where CUDA "
        "is available)"
    )


def _context() -> multiprocessing.context.BaseContext:
    import torch

    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # read when the server starts: on the first child
    return context


def _report(sender: Any, function: Callable[..., Any], args: tuple) -> None:
    sender.send(("started", None))  # `function` and `args` are unpickled (their modules imported): only work is left
    try:
        message = ("ok", function(*args))
    except VgrtError as err:
        message = ("raised", err)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it; a child has no one else to tell
        message = ("failed", "\n".join(traceback.format_exc().strip().splitlines()[-15:]))
    sender.send(message)
    sender.close()


def baseline_rss_bytes() -> int:
    """Peak resident memory of a child that does nothing: what the server's imports add to every child's
    peak (about what any vgrt process that composes holds before it opens a model)."""
    from vgrt.bench.machine import peak_rss_bytes

    return run_in_child(peak_rss_bytes, what="an empty child")
