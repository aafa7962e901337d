"""Library warnings that say nothing to a vgrt user, silenced where they arise and nowhere else.

Each use names the warnings it drops (category and message start), so a new warning from the same call
still shows. With `vgrt -v` (vgrt logging at DEBUG) nothing is dropped.
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
