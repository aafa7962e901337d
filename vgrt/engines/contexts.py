"""Per-call contexts: how one runner serves several callers at once.

What a call writes besides its feed and its fresh outputs (reused output buffers, an ONNX Runtime IO
binding, a TensorRT execution context with its bound buffers, stream and CUDA graph) can serve one call
at a time. A runner keeps that state in a context, and each call holds one from a `ContextPool` for its
duration: a free one, else a new one while fewer than `limit` exist, else it waits for one to come back.
Callers in parallel never share state, so their results are the serial ones; a single caller gets the
same context call after call, so its hot path allocates nothing.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from vgrt.errors import VgrtError

Context = TypeVar("Context")


class ContextPool(Generic[Context]):
    """Contexts made by `make()` on demand, at most `limit` of them (None: one per concurrent call).

    `acquire()` hands one to a single caller until its block ends, also when the block raises.
    `clear()` drops the idle contexts; those in use when it runs are dropped when they come back.
    """

    def __init__(self, make: Callable[[], Context], limit: int | None = None):
        if limit is not None and limit < 1:
            raise VgrtError(f"a context pool needs a limit of at least 1 (or None for no limit), got {limit}")
        self._make, self.limit = make, limit
        self._idle: list[Context] = []
        self._made = 0  # contexts that exist, idle or in use
        self._generation = 0  # bumped by clear(): contexts of an older one are not taken back
        self._changed = threading.Condition(threading.Lock())

    @property
    def made(self) -> int:
        """How many contexts exist (idle or in use)."""
        return self._made

    @contextmanager
    def acquire(self) -> Iterator[Context]:
        context, generation = self._take()
        try:
            yield context
        finally:
            self._give_back(context, generation)

    def clear(self) -> list[Context]:
        """Drop the idle contexts and return them (for their owner to release what they hold)."""
        with self._changed:
            dropped, self._idle = self._idle, []
            self._made -= len(dropped)
            self._generation += 1
            self._changed.notify_all()
        return dropped

    def _take(self) -> tuple[Context, int]:
        with self._changed:
            self._changed.wait_for(self._can_take)
            generation = self._generation
            if self._idle:
                return self._idle.pop(), generation  # the most recently used: a lone caller keeps its own
            self._made += 1
        try:
            return self._make(), generation  # outside the lock: making one may be slow (a TensorRT context)
        except BaseException:
            with self._changed:
                self._made -= 1
                self._changed.notify()
            raise

    def _can_take(self) -> bool:
        return bool(self._idle) or self.limit is None or self._made < self.limit

    def _give_back(self, context: Context, generation: int) -> None:
        with self._changed:
            if generation == self._generation:
                self._idle.append(context)
            else:
                self._made -= 1
            self._changed.notify()
