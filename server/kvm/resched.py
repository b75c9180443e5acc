"""need_resched and cond_resched for the model's long loops that hold no lock.

KVM's long loops (KVM_RUN of a guest that keeps exiting, MADV_POPULATE_WRITE, a KSM scan)
call `cond_resched()`: the scheduler tick sets need_resched, and the loop gives the CPU
away at its next safe point. Here the CPU is the event loop that serves every VM and every
client: a loop whose `Timeslice` has run out gives it away at
its next safe point, so that no single request holds the others up for longer than about
a slice. Walks under `mmu_lock` yield by `tdp_mmu`'s own `cond_resched`, which drops the
lock as well.

The event loop is one CPU, and a loop that gave it away gets it back in its turn: one
such loop resumes per turn of the event loop, in the order they gave it away, each for a
new slice. With `asyncio.sleep(0)` alone, every loop that yielded in a turn resumed in
the next, each for a whole slice: a turn held as many slices as loops had yielded (two
or three populates' in the load benchmark's setup: 6 ms), and every gRPC completion
waited behind them. Now a turn holds at most one resumed slice and the first slice of an
operation just started (the run queue starts at most one vCPU run a turn); the others'
slices come turns later, with the completions handled in between.

A VM with a schedule seed never yields here: only its seeded preemption points switch
tasks, so that a seed replays the same interleaving.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
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
        await _cpu(asyncio.get_running_loop()).resched()
        self._end = perf_counter_ns() + TIMESLICE_NS
        return True


class _Cpu:
    """The event loop as a CPU for the loops that gave it away: `resched()` returns in
    a later turn, after the callers that came before it, one caller per turn. A caller
    cancelled while it waits is skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def resched(self) -> None:
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._loop.call_soon(self._tick)
        await waiter

    def _tick(self) -> None:
        """A turn of the loop: the first caller still waiting gets the CPU back; the next
        one the turn after (`_tick` is due while anyone waits)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if self._waiters:
            self._loop.call_soon(self._tick)


_cpus: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Cpu] = \
    weakref.WeakKeyDictionary()


def _cpu(loop: asyncio.AbstractEventLoop) -> _Cpu:
    cpu = _cpus.get(loop)
    if cpu is None:
        cpu = _cpus[loop] = _Cpu(loop)
    return cpu
