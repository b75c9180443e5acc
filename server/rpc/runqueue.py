"""The run queue: vCPU runs start in order, at most one every `TURNS_PER_RUN` turns of the
event loop, so that the loop turns over faster than gRPC's completions arrive.

Why: grpc.aio learns of completions (a call accepted, a message read or sent) from a
thread blocked in the completion queue, which queues each one and writes one byte to a
socket the event loop watches; the loop's reader reads one byte a turn and handles every
completion queued. While completions arrive faster than the loop turns, the bytes pile
up until the socket's buffer is full (about 200 one-byte writes); from then on the thread
blocks after each completion, and the server receives one completion per turn, each behind
the ~200 already waiting. A unary call needs about four completions one after the other,
and grpc.aio accepts the calls of one method one at a time, so under 128 Run streams (two
completions a step) 128 RunBatch callers got 16 calls a second between them, and a lone
GetVm waited hundreds of milliseconds: every call waited its turn in a queue hundreds of
turns long, once per completion (docs/benchmarks.md, load).

Starting a run only every `TURNS_PER_RUN` turns leaves the loop turns to spare: the
socket drains, the thread no longer blocks, each turn handles every completion that has
arrived, and a RunBatch call and a stream's step wait in the same queue. The spare turns
are cheap (no run in them) and only taken while runs are waiting. A run waits only to
start: once started it holds nothing, so one that blocks (on `mmu_lock`, a held
invalidation, its clock) keeps no other run from starting.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ["RunQueue", "TURNS_PER_RUN"]

# A step of a Run stream brings two completions (its request read, its answer sent) and
# a RunBatch call about four; three turns a run kept the loop ahead of them under load.
TURNS_PER_RUN = 3


class RunQueue:
    """Admission of runs to the event loop of the server that made it.

    `await queue.admit()` returns at once (without a task switch) when no run was
    admitted in the last `TURNS_PER_RUN` turns of the loop and none is waiting; otherwise
    the caller waits, in arrival order, for its turn. A waiter cancelled while it waits is
    skipped; one cancelled after its turn came costs that turn only."""

    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turns_left = 0    # turns before the next admission; > 0 while `_tick` is due

    async def admit(self) -> None:
        if not self._turns_left:
            self._start_turn()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _start_turn(self) -> None:
        self._turns_left = TURNS_PER_RUN
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        """A turn of the loop since the last admission: after `TURNS_PER_RUN` of them,
        admit the first waiter still waiting, if any."""
        self._turns_left -= 1
        if self._turns_left:
            asyncio.get_running_loop().call_soon(self._tick)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._start_turn()
                return
