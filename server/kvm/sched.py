"""Preemption points: the named places where real KVM can be preempted or raced.

`await vm.sched.point("fault.before_lock")` marks such a place. In normal runs a point
awaits an already-finished awaitable: no task switch, next to no cost.

A VM created with a schedule seed runs deterministically: at each point the seeded
scheduler decides how many turns of the event loop's ready queue the task gives away
(none, a few, or many). The ready queue is FIFO and a scenario has no outside input, so the
same seed gives the same interleaving and the same result, and different seeds explore
different ones. The last points passed are kept as a trace for the sanitizers' reports.

A VM in virtual time (clock.py) schedules by virtual time instead: at a point the running
actor gives the turn to an earlier one, if any; the seed breaks ties.
"""

from __future__ import annotations

import asyncio
import collections
import random
from asyncio import current_task

from .clock import DONE, VirtualClock

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
    "rmap.lock_spin",             # a writer found an rmap head locked and waits for it
    "rmap_age.before_clear",      # lockless rmap aging read a young SPTE, holds its head
    "rmap_age.next_spte",         # lockless rmap aging between two entries of a descriptor
    "shadow.cond_resched",        # zap of obsolete shadow pages dropped mmu_lock
    "attributes.store",           # memory attributes: range invalidated, not yet stored
    "gmem.truncate",              # a guest_memfd hole: range invalidated, pages not yet freed
)

_KNOWN = frozenset(POINTS)
TRACE_LENGTH = 24
_TURNS = (0, 0, 0, 0, 1, 1, 2, 3, 5, 8, 13, 40)   # turns given away: mostly few, some many


class Scheduler:
    def __init__(self, seed: int | None = None, clock: VirtualClock | None = None) -> None:
        self.seed = seed
        self.deterministic = seed is not None
        self.preempts = self.deterministic or clock is not None   # may a point switch?
        self.clock = clock
        self._rng = random.Random(seed)
        self.trace: collections.deque[tuple[str, str]] = collections.deque(maxlen=TRACE_LENGTH)
        self.points_passed = 0
        if clock is not None:
            self.point = self._virtual_point
        elif not self.deterministic:
            # Free-running, a point is a lookup of its name (an unknown one raises
            # KeyError) that gives back DONE: no Python frame on the fault path.
            self.point = dict.fromkeys(POINTS, DONE).__getitem__

    def point(self, name: str):
        """The awaitable of the preemption point `name` (deterministic: free-running, the
        instance's own lookup above answers instead)."""
        if name not in _KNOWN:
            raise KeyError(name)
        return self._switch(name)

    def _virtual_point(self, name: str):
        """In virtual time a point is where the clock may give the turn to an earlier
        actor: the schedule is virtual time's, its ties broken by the seed."""
        if name not in _KNOWN:
            raise KeyError(name)
        self.points_passed += 1
        clock = self.clock
        actor = clock.current
        # `_stepping` answers for a coroutine `gather` steps: `me()` only for a task.
        if actor is None or actor.task is not (clock._stepping or clock.me()):
            self.trace.append(("?", name))
            return DONE                      # a task outside the simulation: no switch
        self.trace.append((actor.name, name))
        return clock.point()

    async def _switch(self, name: str) -> None:
        self.points_passed += 1
        task = current_task()
        self.trace.append((task.get_name() if task else "?", name))
        for _ in range(self._rng.choice(_TURNS)):
            await asyncio.sleep(0)

    def describe_trace(self) -> str:
        return " -> ".join(f"{task}@{point}" for task, point in self.trace)
