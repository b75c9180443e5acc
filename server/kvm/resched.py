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

__all__ = ["Timeslice", "TIMESLICE_NS", "TurnQueue"]

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
        await _cpu(asyncio.get_running_loop()).take(1, wait=True)
        self._end = perf_counter_ns() + TIMESLICE_NS
        return True


class TurnQueue:
    """Callers let through one at a time, in arrival order, on the event loop that runs
    them: after a caller goes through, `gap` turns of the loop pass before the next does.
    A caller cancelled while it waits is skipped; one cancelled after it went through
    costs its gap only.

    The two users: a loop whose timeslice ran out always waits for a later turn and
    leaves one turn to the next (`Timeslice.cond_resched`); the server's run queue lets a
    run start at once when nobody waits and the turns after the last run have passed
    (`rpc/runqueue.py`)."""

    def __init__(self) -> None:
        self._waiters: collections.deque[tuple[asyncio.Future[None], int]] = \
            collections.deque()
        self._turns_left = 0    # turns before the next caller goes; > 0 while `_tick` is due

    async def take(self, gap: int, *, wait: bool) -> None:
        """Go through in turn, then let `gap` (>= 1) turns pass before the next caller. A
        caller that need not `wait` goes through at once, without a task switch, when no
        turns are left to pass (so nobody waits); one that must waits for one turn at
        least."""
        if not self._turns_left:
            if not wait:
                self._start_turns(gap)
                return
            self._start_turns(1)            # the turn it waits for
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, gap))
        await waiter

    def _start_turns(self, gap: int) -> None:
        assert gap >= 1, gap
        self._turns_left = gap
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        """A turn of the loop: once the turns to pass have, the first caller still
        waiting goes through, and its gap starts."""
        self._turns_left -= 1
        if self._turns_left:
            asyncio.get_running_loop().call_soon(self._tick)
            return
        while self._waiters:
            waiter, gap = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._start_turns(gap)
                return


# The event loop as a CPU for the loops that gave it away: one of them a turn, in order.
_cpus: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnQueue] = \
    weakref.WeakKeyDictionary()


def _cpu(loop: asyncio.AbstractEventLoop) -> TurnQueue:
    cpu = _cpus.get(loop)
    if cpu is None:
        cpu = _cpus[loop] = TurnQueue()
    return cpu
