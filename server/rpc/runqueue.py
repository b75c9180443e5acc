"""The run queue: vCPU runs start in order, and each is followed by a turn of the event loop
for every completion gRPC brings for it and one spare, so that the loop turns over faster
than gRPC's completions arrive.

Why: grpc.aio learns of completions (a call accepted, a message read or sent) from a
thread blocked in the completion queue, which queues each one and writes one byte to a
socket the event loop watches; the loop's reader reads one byte a turn and handles every
completion queued. While completions arrive faster than the loop turns, the bytes pile
up until the socket's buffer is full (about 270 one-byte writes); from then on the thread
blocks after each completion, and the server receives one completion per turn, each behind
the ~270 already waiting. Every call then waits its turn in a queue hundreds of turns
long, once per completion: 128 RunBatch callers under 128 Run streams got 16 calls a
second between them, and a lone GetVm waited 100-400 ms before its handler started
(docs/benchmarks.md, load).

Counting turns per completion keeps the loop ahead of them: a RunBatch call brings four
(accepted, request read, answer sent, call closed), a Run stream's step two (request read,
answer sent). After a run the queue lets a turn pass per completion and one more before it
starts the next: the spare turn is for the completions of calls that are not runs (a
GetVm) and for a backlog that a burst built to drain. The socket then stays nearly empty
(a median of 7 bytes under the load benchmark, against 224 at three turns a run) and each
turn handles every completion that has come. The spare turns are cheap (no run in them)
and only taken while runs are waiting. A run waits only to start: once started it holds
nothing, so one that blocks (on `mmu_lock`, a held invalidation, its clock) keeps no other
run from starting.
"""

from __future__ import annotations

from vmmu.server.kvm.resched import TurnQueue

__all__ = ["RunQueue", "RUN_BATCH_COMPLETIONS", "RUN_STEP_COMPLETIONS", "turns_after"]

RUN_BATCH_COMPLETIONS = 4   # a RunBatch call: accepted, request read, answer sent, closed
RUN_STEP_COMPLETIONS = 2    # a step of a Run stream: request read, answer sent


def turns_after(completions: int) -> int:
    """The turns of the loop that follow a run bringing `completions` before the next run
    starts: one per completion and one spare."""
    return completions + 1


class RunQueue:
    """Admission of runs to the event loop of the server that made it.

    `await queue.admit(completions)` returns at once (without a task switch) when the
    turns that followed the last run admitted have passed and no run is waiting;
    otherwise the caller waits, in arrival order, for its turn. After it the queue lets
    `turns_after(completions)` turns pass before it admits the next (the model's
    `TurnQueue`)."""

    def __init__(self) -> None:
        self._turns = TurnQueue()

    async def admit(self, completions: int) -> None:
        await self._turns.take(turns_after(completions), wait=False)
