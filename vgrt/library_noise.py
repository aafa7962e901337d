"""Library warnings that say nothing to a vgrt user, silenced where they arise and nowhere else.

`warnings_silenced` drops the warnings a call names (category and message start), so a new warning
from the same call still shows; `torch_onnx_warnings_translated` keeps torch.onnx's export chatter off
the terminal and passes on what may matter as one vgrt line. With `vgrt -v` (vgrt logging at DEBUG)
nothing is dropped.
"""

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("vgrt")


@contextmanager
def warnings_silenced(*dropped: tuple[type[Warning], str]) -> Iterator[None]:
    """Drop the warnings of each (category, message start) while the block runs, unless vgrt logs at DEBUG.

    `warnings.catch_warnings` swaps process-wide state (before Python 3.14), so keep the block to the one
    library call that warns.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with warnings.catch_warnings():
        for category, message in dropped:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        yield


# torch.onnx's messages that say nothing about the exported graph: its own deprecations, dynamic axis
# names it merged (vgrt's specs share names on purpose), and torchvision ops it skips registering.
_HARMLESS = ("will not be used, since it shares the same shape constraints", "torchvision is not installed")


@contextmanager
def torch_onnx_warnings_translated(component: str) -> Iterator[None]:
    """Keep torch.onnx's per-component warnings and log lines off the terminal, and pass any that may
    matter on as one vgrt line each. With -v (vgrt logging at DEBUG) everything shows as it arises."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    torch_onnx = logging.getLogger("torch.onnx")
    collector = _Collector()
    handlers, torch_onnx.handlers = torch_onnx.handlers, [collector]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch_onnx.handlers = handlers
    messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    messages += [record.getMessage() for record in collector.records if record.levelno >= logging.WARNING]
    for message in dict.fromkeys(m.strip().splitlines()[0] for m in messages if m.strip()):
        if not any(harmless in message for harmless in _HARMLESS):
            log.warning("torch.onnx warned while exporting %s: %s", component, message)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
