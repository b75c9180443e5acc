"""`mmu_lock`: the VM's reader/writer lock, fair, with owner tracking.

Faults, eager splits and zaps of invalidated roots take it for read ("shared": SPTE writes
must then be atomic, i.e. compare-and-exchange); MMU-notifier invalidation, memslot zaps and
root invalidation take it for write.

Behaviour:
- FIFO: a request that arrives while anyone waits queues behind it, so neither a stream of
  readers nor a stream of writers can starve the other. When the lock frees, the head
  writer is granted alone, or every reader at the head of the queue together.
- Ownership is handed over at release: a granted waiter owns the lock before it runs.
- Cancellation: a cancelled waiter leaves the queue; if it was granted in the meantime, the
  grant is released as if it had run, so cancellation never leaks the lock.
- The owner is the asyncio task (in virtual time, `clock.me()`: a coroutine the clock
  steps itself owns it as a task would). Read recursion is a bug. With `lockdep` (the VM's
  sanitizers) `assert_held_read/write` check that the running task is an owner; without
  it, as in a kernel built without lockdep, they check only that the lock is held in
  that mode.
- An uncontended acquire does not suspend: `acquire_read/write` grant at once and return an
  awaitable that is already done, and leaving `async with` is no coroutine at all; only a
  waiter gets a coroutine of its own.
- In virtual time (clock.py) the lock is held in virtual time too: an acquire is taken in
  the order of virtual time (it is a preemption point), a reader is granted no earlier than
  the last writer released it, a writer no earlier than every earlier holder released it,
  and a waiter resumes at the virtual time of its grant. What it costs: an atomic on the
  lock word, plus a cache-line transfer for each other CPU that took the lock within the
  last microsecond (the line bounces between them). Wait times are then virtual ns.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from dataclasses import dataclass

from asyncio import current_task

from .clock import DONE, VirtualClock, park, wake

__all__ = ["MmuLock", "LockStatistics", "LockAssertion"]

_CONTENDED = {"read": "read_contended", "write": "write_contended"}
_WAIT_NS = {"read": "read_wait_ns", "write": "write_wait_ns"}


class LockAssertion(AssertionError):
    """A locking contract was broken."""


@dataclass(frozen=True)
class LockStatistics:
    read_acquisitions: int
    write_acquisitions: int
    read_contended: int
    write_contended: int
    read_wait_ns: int
    write_wait_ns: int
    read_hold_ns: int           # virtual time only: how long holders held it
    write_hold_ns: int
    readers: int
    writer: bool
    waiters: int


class _Guard:
    """`async with lock.read` / `lock.write`."""

    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire, release) -> None:
        self._acquire, self._release = acquire, release

    def __aenter__(self):
        return self._acquire()

    def __aexit__(self, *exc):
        self._release()
        return DONE


_NO_LOOP = object()         # a key no event loop matches: a lock's first use finds its loop


class MmuLock:
    READ, WRITE = "read", "write"

    def __init__(self, lockdep: bool = True, clock: VirtualClock | None = None) -> None:
        self.lockdep = lockdep
        self.clock = clock
        if not lockdep:
            self.assert_held_read = self._assert_held_read_mode
            self.assert_held_write = self._assert_held_write_mode
            self.assert_held = self._assert_held_mode
        self._loop: object = _NO_LOOP           # the event loop it last ran in
        self._readers: dict[asyncio.Task | None, int] = {}
        self._writer: asyncio.Task | None = None
        self._waiters: collections.deque[tuple[str, asyncio.Future, asyncio.Task, object]] = \
            collections.deque()
        # Virtual time: when the last writer and the last of the readers let go, and the
        # recent acquisitions that share the lock word's cache line.
        self._write_free_at = 0
        self._read_free_at = 0
        self._recent: collections.deque[tuple[int, object]] = collections.deque()
        self._recent_by_actor: dict[object, int] = {}
        self._granted_at: dict[asyncio.Task | None, int] = {}
        self._stats = {"read_acquisitions": 0, "write_acquisitions": 0, "read_contended": 0,
                       "write_contended": 0, "read_wait_ns": 0, "write_wait_ns": 0,
                       "read_hold_ns": 0, "write_hold_ns": 0}
        if clock is not None:
            self._current_task = clock.me        # a coroutine the clock steps owns too
            # The mode bound in C: a Python frame less on every fault's acquire.
            self.acquire_read = functools.partial(self._acquire_virtual, self.READ)
            self.acquire_write = functools.partial(self._acquire_virtual, self.WRITE)
            self.release_read = self._release_read_virtual
            self.release_write = self._release_write_virtual
        self.read = _Guard(self.acquire_read, self.release_read)
        self.write = _Guard(self.acquire_write, self.release_write)

    # -- acquire/release ----------------------------------------------------------

    def _current_task(self) -> asyncio.Task | None:
        """The running task, asked of the loop the lock last ran in: `current_task()`
        without a loop finds the running loop first, which on Python 3.11 costs a
        getpid() system call each time (two per fault)."""
        return current_task(self._loop) or self._task_in_running_loop()

    def _task_in_running_loop(self) -> asyncio.Task | None:
        """The lock's first use, or its first in another event loop."""
        self._loop = asyncio.get_running_loop()
        return current_task(self._loop)

    def acquire_read(self):
        """Take the lock for read: returns an awaitable, already done when granted at once."""
        task = current_task(self._loop) or self._task_in_running_loop()
        readers = self._readers
        if self._writer is None and not self._waiters and task not in readers:
            self._stats["read_acquisitions"] += 1
            readers[task] = 1
            return DONE
        return self._queue(self.READ, task)

    def acquire_write(self):
        """Take the lock for write: returns an awaitable, already done when granted at once."""
        task = current_task(self._loop) or self._task_in_running_loop()
        if self._writer is None and not self._readers and not self._waiters:
            self._stats["write_acquisitions"] += 1
            self._writer = task
            return DONE
        return self._queue(self.WRITE, task)

    def _queue(self, mode: str, task: asyncio.Task | None):
        """The acquire that cannot be granted at once: a recursive one (the grant at once
        never goes to a holder), or one that must wait its turn."""
        if task in self._readers or self._writer is task:
            raise LockAssertion("mmu_lock taken recursively by the same task")
        self._stats[f"{mode}_acquisitions"] += 1
        return self._wait(mode, task)

    async def _wait(self, mode: str, task: asyncio.Task) -> None:
        clock = self.clock
        if clock is None:               # in virtual time, counted by the virtual grant
            self._stats[f"{mode}_contended"] += 1
        fut = asyncio.get_running_loop().create_future()
        actor = park(clock)
        entry = (mode, fut, task, actor)
        self._waiters.append(entry)
        start = time.perf_counter_ns()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():    # granted, then cancelled: give it back
                if mode == self.READ:
                    del self._readers[task]
                else:
                    self._writer = None
                self._grant()
            else:
                if entry in self._waiters:             # a release may have popped it already
                    self._waiters.remove(entry)
                self._grant()                          # we may have blocked readers behind
            raise
        finally:
            if clock is None:
                self._stats[f"{mode}_wait_ns"] += time.perf_counter_ns() - start

    def release_read(self) -> None:
        self._release_read_by(current_task(self._loop) or self._task_in_running_loop())

    def release_write(self) -> None:
        self._release_write_by(current_task(self._loop) or self._task_in_running_loop())

    def _release_read_by(self, owner) -> None:
        if self._readers.pop(owner, None) is None:
            raise LockAssertion("mmu_lock released for read by a task that does not hold it")
        if self._waiters:
            self._grant()

    def _release_write_by(self, owner) -> None:
        if self._writer is None or self._writer is not owner:
            raise LockAssertion("mmu_lock released for write by a task that does not hold it")
        self._writer = None
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        while self._waiters and self._writer is None:
            mode, fut, task, actor = self._waiters[0]
            if fut.done():                            # cancelled, cleanup pending
                self._waiters.popleft()
                continue
            if mode == self.WRITE:
                if self._readers:
                    return
                self._waiters.popleft()
                self._writer = task
                self._hand_over(fut, actor)
                return
            self._waiters.popleft()
            self._readers[task] = 1
            self._hand_over(fut, actor)

    def _hand_over(self, fut: asyncio.Future, actor) -> None:
        wake(self.clock, actor, fut)         # in virtual time: at the releaser's time

    # -- virtual time ---------------------------------------------------------------

    def _acquire_virtual(self, mode: str):
        """The acquire in virtual time: the preemption point, then the grant; an awaitable,
        already done when neither the point switched nor the grant has to wait."""
        clock = self.clock
        task = clock.me()
        actor = clock.current
        if actor is None or actor.task is not task:
            raise LockAssertion("mmu_lock taken outside the simulation of a VM in virtual "
                                "time")
        turn = clock.point()                 # acquires are taken in virtual-time order
        if turn is DONE:
            return self._take_virtual(mode, task, actor)
        return self._take_after(turn, mode, task, actor)

    async def _take_after(self, turn, mode: str, task: asyncio.Task, actor) -> None:
        await turn
        await self._take_virtual(mode, task, actor)

    def _take_virtual(self, mode: str, task: asyncio.Task, actor):
        """Grant at the actor's time if the lock is free for `mode`; else queue."""
        if mode == self.READ:
            if self._writer is None and not self._waiters and task not in self._readers:
                self._stats["read_acquisitions"] += 1
                self._readers[task] = 1
                return self._granted(mode, task, actor, actor.time, self._write_free_at)
        elif self._writer is None and not self._readers and not self._waiters:
            self._stats["write_acquisitions"] += 1
            self._writer = task
            return self._granted(mode, task, actor, actor.time,
                                 max(self._write_free_at, self._read_free_at))
        return self._take_queued(mode, task, actor)

    async def _take_queued(self, mode: str, task: asyncio.Task, actor) -> None:
        asked = actor.time
        await self._queue(mode, task)
        free_at = self._write_free_at if mode == self.READ else \
            max(self._write_free_at, self._read_free_at)
        await self._granted(mode, task, actor, asked, free_at)

    def _granted(self, mode: str, task: asyncio.Task, actor, asked: int, free_at: int):
        """The lock is ours since virtual time `asked`; the holders before us let go at
        `free_at`: pay the atomic and the line's transfers, and wait in virtual time.

        The line's transfers: one for each other CPU that took the lock within the
        contention window (`recent`, oldest first, at most MAX_SHARERS entries; counted
        by CPU in `by_actor`). Done inline: every fault's acquire counts them."""
        clock = self.clock
        costs = clock.costs
        recent, by_actor, t = self._recent, self._recent_by_actor, actor.time
        oldest = t - clock.CONTENTION_WINDOW_NS
        while recent and (recent[0][0] < oldest or len(recent) >= clock.MAX_SHARERS):
            _, gone = recent.popleft()
            if by_actor[gone] == 1:
                del by_actor[gone]
            else:
                by_actor[gone] -= 1
        sharers = len(by_actor) - (actor in by_actor)
        recent.append((t, actor))
        by_actor[actor] = by_actor.get(actor, 0) + 1
        clock.charge(costs.lock_acquire + costs.cacheline_transfer * sharers)
        t = actor.time
        granted = free_at if free_at > t else t
        if granted > asked + costs.lock_acquire:          # waited beyond its own atomic
            stats = self._stats
            stats[_CONTENDED[mode]] += 1
            stats[_WAIT_NS[mode]] += granted - asked
        if granted > t:
            return self._hold_from(clock.sleep_until(granted), task, actor)
        self._granted_at[task] = t
        return DONE

    async def _hold_from(self, sleep, task: asyncio.Task, actor) -> None:
        await sleep
        self._granted_at[task] = actor.time

    def _release_read_virtual(self) -> None:
        clock = self.clock
        clock.charge(clock.costs.lock_acquire)
        t = clock.time()
        if t > self._read_free_at:
            self._read_free_at = t
        owner = clock.me()
        self._stats["read_hold_ns"] += t - self._granted_at.pop(owner, t)
        self._release_read_by(owner)         # the lock itself

    def _release_write_virtual(self) -> None:
        clock = self.clock
        clock.charge(clock.costs.lock_acquire)
        t = self._write_free_at = clock.time()
        owner = clock.me()
        self._stats["write_hold_ns"] += t - self._granted_at.pop(owner, t)
        self._release_write_by(owner)

    # -- contracts ----------------------------------------------------------------

    def assert_held_read(self) -> None:
        if self._current_task() not in self._readers:
            raise LockAssertion("mmu_lock must be held for read here")

    def assert_held_write(self) -> None:
        if self._writer is None or self._writer is not self._current_task():
            raise LockAssertion("mmu_lock must be held for write here")

    def assert_held(self) -> None:
        task = self._current_task()
        if task is None or (self._writer is not task and task not in self._readers):
            raise LockAssertion("mmu_lock must be held here")

    def _assert_held_read_mode(self) -> None:
        if not self._readers:
            raise LockAssertion("mmu_lock must be held for read here")

    def _assert_held_write_mode(self) -> None:
        if self._writer is None:
            raise LockAssertion("mmu_lock must be held for write here")

    def _assert_held_mode(self) -> None:
        if self._writer is None and not self._readers:
            raise LockAssertion("mmu_lock must be held here")

    def held_for_write(self) -> bool:
        return self._writer is not None and self._writer is self._current_task()

    def needbreak(self) -> bool:
        """`rwlock_needbreak`: someone waits, so a long walk should yield."""
        return bool(self._waiters)

    def statistics(self) -> LockStatistics:
        return LockStatistics(**self._stats, readers=len(self._readers),
                              writer=self._writer is not None, waiters=len(self._waiters))
