"""Preemption points: the named places where real KVM can be preempted or raced.

`await vm.sched.point("fault.before_lock")` marks such a place. In normal runs a point
awaits an already-finished awaitable: no task switch, next to no cost.

A VM created with a schedule seed runs deterministically: at each point the seeded
scheduler decides how many turns of the event loop's ready queue the task gives away
(none, a few, or many). The ready queue is FIFO and a scenario has no outside input, so the
same seed gives the same interleaving and the same result, and different seeds explore
different ones. The last points passed are kept as a trace for the sanitizers' reports.
"""

from __future__ import annotations

import asyncio
import collections
import random
from asyncio import current_task

__all__ = ["Scheduler", "POINTS", "DONE"]

POINTS = (
    "fault.after_seq_snapshot",   # between mmu_seq snapshot and the pfn lookup
    "fault.hva_to_pfn",           # the pfn lookup may sleep
    "fault.before_lock",          # pfn resolved, mmu_lock not yet taken
    "vcpu.retry",                 # RET_PF_RETRY: the vCPU re-enters the guest
    "vcpu.entry",                 # a vCPU about to enter the guest
    "mm.invalidate_window",       # the host between invalidate_range_start and _end
    "tdp.cond_resched",           # a long walk dropped mmu_lock
    "fast_pf.cas",                # the fast page fault between reading an SPTE and its cmpxchg
    "age.before_clear",           # lockless aging read a young SPTE and has not aged it yet
    "gpc.refresh_hva_to_pfn",     # GPC refresh snapshotted its sequence, lookup to come
    "gpc.refresh_before_valid",   # GPC refresh has a pfn and has not set valid yet
)

TRACE_LENGTH = 24
_TURNS = (0, 0, 0, 0, 1, 1, 2, 3, 5, 8, 13, 40)   # turns given away: mostly few, some many


class _Done:
    """An awaitable that is already finished: awaiting it never switches tasks."""

    __slots__ = ()

    def __await__(self):
        return iter(())


DONE = _Done()


class Scheduler:
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.deterministic = seed is not None
        self._rng = random.Random(seed)
        self.trace: collections.deque[tuple[str, str]] = collections.deque(maxlen=TRACE_LENGTH)
        self.points_passed = 0

    def point(self, name: str):
        if not self.deterministic:
            return DONE
        return self._switch(name)

    async def _switch(self, name: str) -> None:
        self.points_passed += 1
        task = current_task()
        self.trace.append((task.get_name() if task else "?", name))
        for _ in range(self._rng.choice(_TURNS)):
            await asyncio.sleep(0)

    def describe_trace(self) -> str:
        return " -> ".join(f"{task}@{point}" for task, point in self.trace)
