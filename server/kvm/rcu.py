"""RCU for page-table pages: read-side sections, `call_rcu`, grace periods.

A callback queued by `call_rcu` runs only once every read-side section that was active when
it was queued has ended (a grace period). Sections may span `await`s (preemptible RCU).
Lockless walkers (fast page fault, aging, the hardware walker's view of a freed table) run
inside sections, so a table unlinked while they read it is still intact until they leave.

In virtual time (clock.py) `synchronize` parks its actor until the section that ends the
grace period exits, and lasts at least the cost table's `rcu_grace_period`. A section
that begins and ends between two awaits has no width in real order: a grace period
processed after it does not wait for it, whatever their virtual times.
"""

from __future__ import annotations

import asyncio
import collections
from contextlib import contextmanager

from .clock import VirtualClock

__all__ = ["Rcu"]


class Rcu:
    """Sections are counted by the sequence they began at: those that began since the last
    `call_rcu` in `_current` (they hold up no callback: every queued one is older), the
    others in `_older`, whose oldest entry is what the oldest callback waits for."""

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock
        self._seq = 0                                    # advances at every call_rcu
        self._current = 0                                # sections open that began at _seq
        self._older: dict[int, int] = {}                 # earlier start seq -> sections open
        self._callbacks: collections.deque[tuple[int, object]] = collections.deque()
        self.grace_periods = 0                           # ends that ran callbacks
        self.callbacks_run = 0

    @contextmanager
    def read_lock(self):
        token = self.enter()
        try:
            yield
        finally:
            self.exit(token)

    def enter(self) -> int:
        """`rcu_read_lock`: returns the token `exit` takes."""
        self._current += 1
        return self._seq

    def exit(self, token: int) -> None:
        """`rcu_read_unlock`."""
        if token == self._seq:
            self._current -= 1
            return
        older = self._older
        n = older[token] - 1
        if n:
            older[token] = n
        else:
            del older[token]
            self._advance()                  # a grace period may have ended just now

    def in_reader(self) -> bool:
        return bool(self._current or self._older)

    def call_rcu(self, callback) -> None:
        """Run `callback()` after every section active now has ended."""
        if self._current:
            self._older[self._seq] = self._current
            self._current = 0
        self._seq += 1
        self._callbacks.append((self._seq, callback))
        self._advance()

    def _advance(self) -> None:
        oldest = min(self._older) if self._older else None
        callbacks = self._callbacks
        if callbacks and (oldest is None or oldest >= callbacks[0][0]):
            self.grace_periods += 1
        while callbacks and (oldest is None or oldest >= callbacks[0][0]):
            _, callback = callbacks.popleft()
            self.callbacks_run += 1
            callback()

    async def synchronize(self) -> None:
        """Wait for a grace period: every section active now has ended."""
        fut = asyncio.get_running_loop().create_future()
        clock = self.clock
        if clock is None:
            self.call_rcu(lambda: fut.done() or fut.set_result(None))
            await fut
            return
        shortest = clock.time() + clock.costs.rcu_grace_period
        actor = clock.park()
        self.call_rcu(lambda: clock.wake(actor, fut, shortest))
        await fut

    async def barrier(self) -> None:
        """Wait until every callback queued so far has run."""
        await self.synchronize()

    @property
    def pending(self) -> int:
        return len(self._callbacks)
