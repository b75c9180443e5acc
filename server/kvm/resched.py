"""need_resched and cond_resched for the model's long loops that hold no lock.

KVM's long loops (KVM_RUN of a guest that keeps exiting, MADV_POPULATE_WRITE, a KSM scan)
call `cond_resched()`: the scheduler tick sets need_resched, and the loop gives the CPU
away at its next safe point. Here the CPU is the event loop that serves every VM and every
client: a loop whose `Timeslice` has run out gives it away (`await asyncio.sleep(0)`) at
its next safe point, so that no single request holds the others up for longer than about
a slice. Walks under `mmu_lock` yield by `tdp_mmu`'s own `cond_resched`, which drops the
lock as well.

A VM with a schedule seed never yields here: only its seeded preemption points switch
tasks, so that a seed replays the same interleaving.
"""

from __future__ import annotations

import asyncio
from time import perf_counter_ns

__all__ = ["Timeslice", "TIMESLICE_NS"]

TIMESLICE_NS = 2_000_000        # how long a loop may keep the event loop before it yields


class Timeslice:
    """A slice of the event loop for one long operation, started at creation.

    `need_resched()` is the tick's flag, cheap enough to test once per unit of work;
    `cond_resched()` yields if it is set and starts a new slice."""

    __slots__ = ("_end", "_on")

    def __init__(self, sched) -> None:
        self._on = sched is None or not sched.deterministic
        self._end = perf_counter_ns() + TIMESLICE_NS

    def need_resched(self) -> bool:
        return self._on and perf_counter_ns() >= self._end

    async def cond_resched(self) -> bool:
        """Let other tasks run if the slice is used up; returns whether it did."""
        if not self.need_resched():
            return False
        await asyncio.sleep(0)
        self._end = perf_counter_ns() + TIMESLICE_NS
        return True
