"""Client-held MMU-notifier invalidations: an hva range kept between
`invalidate_range_start` and `invalidate_range_end` for as long as a client asks.

A hold plays the host mm thread that has called start() and not yet end(): faults on gfns
in the range retry (reference §4.5) and memslot updates wait for
`mn_active_invalidate_count` to reach zero. Each hold is one task that runs its whole life:

    start()  ->  wait for a release, or for the lease deadline  ->  end()

so start and end always pair, whoever asks for the end and however the asker goes away.
The state is set once, by `release`, and the first cause wins:

    HELD --`end`, or a `hold` body left normally--------> ENDED_BY_CLIENT
         --the lease ran out-----------------------------> LEASE_EXPIRED
         --the holder cancelled, failed or went away-----> CLIENT_GONE
         --Vm.destroy------------------------------------> VM_DESTROYED

Invariant: no VM waits forever on a vanished client. A hold begun with `begin` has a lease
of at most MAX_LEASE_S; a hold taken with `hold` lasts only while its `async with` body
runs, and cancelling the body releases it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import KvmError, NoSuchObject, VmBugged, einval
from .types import PAGE_SIZE

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["HeldInvalidations", "HeldInvalidation", "HeldInvalidationInfo", "HoldState",
           "MAX_LEASE_S", "MAX_HELD", "RECORD_LENGTH"]

MAX_LEASE_S = 60.0      # longest a client may block a VM's memslot updates unattended
MAX_HELD = 64           # holds per VM at once
RECORD_LENGTH = 64      # ended holds remembered per VM, newest last


class HoldState(enum.Enum):
    HELD = "held"
    ENDED_BY_CLIENT = "ended_by_client"
    LEASE_EXPIRED = "lease_expired"
    CLIENT_GONE = "client_gone"
    VM_DESTROYED = "vm_destroyed"


_ENDED_STAT = {HoldState.LEASE_EXPIRED: "invalidations_lease_expired",
               HoldState.CLIENT_GONE: "invalidations_client_gone"}


@dataclass(frozen=True)
class HeldInvalidationInfo:
    id: int
    start: int                  # hva, page aligned
    end: int                    # hva, exclusive
    state: HoldState
    lease_s: float | None       # None: held by an `async with` (a stream), not by a lease


class HeldInvalidation:
    """One hold: its range, its state and the task that runs start(), waits and end()."""

    def __init__(self, held_id: int, start: int, end: int, lease_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.id, self.start, self.end, self.lease_s = held_id, start, end, lease_s
        self.notified = (start, end)         # the range the notifiers see
        self.deadline = None if lease_s is None else loop.time() + lease_s
        self.state = HoldState.HELD
        self.started: asyncio.Future[None] = loop.create_future()
        self.task: asyncio.Task[None] | None = None
        self._released = asyncio.Event()

    def release(self, how: HoldState) -> None:
        """HELD -> `how`; the task then runs end(). Ending a hold twice is ENOENT."""
        if self.state is not HoldState.HELD:
            raise NoSuchObject(f"invalidation {self.id} is not held: it ended "
                               f"({self.state.value})")
        self.state = how
        self._released.set()

    async def released(self) -> None:
        await self._released.wait()

    async def wait_ended(self, clock=None) -> None:
        """Wait until end() has run. Cancelling the wait leaves the hold's task running.
        In virtual time the waiter does not hold the turn meanwhile (`clock.outside`)."""
        if clock is None:
            await asyncio.shield(self.task)
        else:
            await clock.outside(asyncio.shield(self.task))

    def info(self) -> HeldInvalidationInfo:
        return HeldInvalidationInfo(self.id, self.start, self.end, self.state, self.lease_s)


class HeldInvalidations:
    """A VM's holds, the record of how the latest ones ended, and their counters."""

    def __init__(self, vm: "Vm") -> None:
        self._vm = vm
        self._held: dict[int, HeldInvalidation] = {}
        self._ended: collections.deque[HeldInvalidationInfo] = \
            collections.deque(maxlen=RECORD_LENGTH)
        self._ids = itertools.count(1)

    async def begin(self, start: int, end: int, lease_s: float) -> HeldInvalidation:
        """Begin invalidating hva [start, end); returns once start() has run (every SPTE
        of the range is zapped and TLBs are flushed). The hold ends after `lease_s`
        seconds unless `end` comes first."""
        if not 0 < lease_s <= MAX_LEASE_S:          # also refuses NaN
            raise einval(f"lease {lease_s}s is not in (0, {MAX_LEASE_S:g}]")
        return await self._begin(start, end, lease_s)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[HeldInvalidation]:
        """Hold [start, end) while the body runs. Leaving it normally ends the hold
        (ENDED_BY_CLIENT, and waits for end()); leaving it by an exception or a
        cancellation releases it as CLIENT_GONE without waiting."""
        held = await self._begin(start, end, None)
        try:
            yield held
        except BaseException:
            if held.state is HoldState.HELD:
                held.release(HoldState.CLIENT_GONE)
            raise
        if held.state is HoldState.HELD:
            held.release(HoldState.ENDED_BY_CLIENT)
        await held.wait_ended(self._vm.clock)

    async def end(self, held_id: int) -> None:
        """End a hold and wait for end(): faults in the range may then map it."""
        held = self._held.get(held_id)
        if held is None:
            ended = next((h for h in self._ended if h.id == held_id), None)
            how = f": it ended ({ended.state.value})" if ended else ""
            raise NoSuchObject(f"invalidation {held_id} is not held{how}")
        held.release(HoldState.ENDED_BY_CLIENT)
        await held.wait_ended(self._vm.clock)

    async def release_all(self, how: HoldState) -> None:
        """End every hold (VM teardown) and wait until each has run end()."""
        holds = list(self._held.values())
        for held in holds:
            if held.state is HoldState.HELD:
                held.release(how)
        for held in holds:
            await held.wait_ended(self._vm.clock)

    def held(self) -> list[HeldInvalidationInfo]:
        return [h.info() for h in self._held.values() if h.state is HoldState.HELD]

    def ended(self) -> list[HeldInvalidationInfo]:
        return list(self._ended)

    # -- one hold's life ----------------------------------------------------------------

    async def _begin(self, start: int, end: int, lease_s: float | None) -> HeldInvalidation:
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise einval(f"hva range [{start:#x}, {end:#x}) is not page aligned")
        if not 0 <= start < end:
            raise einval(f"hva range [{start:#x}, {end:#x}) is empty")
        if len(self._held) >= MAX_HELD:
            raise KvmError(errno.ENOSPC, f"{MAX_HELD} invalidations are held already")
        held = HeldInvalidation(next(self._ids), start, end, lease_s)
        # What the host mm would announce: a THP cannot change in part without being split
        # first, so the range grows to the huge pages at its edges, mapped or about to be.
        held.notified = self._vm.host.hull(start, end)
        self._held[held.id] = held
        self._vm.stat.invalidations_held += 1
        held.task = asyncio.create_task(self._life(held), name=f"held-invalidation-{held.id}")
        clock = self._vm.clock
        try:
            if clock is None:
                await asyncio.shield(held.started)
            else:
                await clock.outside(asyncio.shield(held.started))
        except asyncio.CancelledError:
            # The caller went away before it learned the id: nobody could end the hold.
            if held.state is HoldState.HELD:
                held.release(HoldState.CLIENT_GONE)
            raise
        return held

    async def _life(self, held: HeldInvalidation) -> None:
        """The hold's own task: in virtual time a host-side actor of its own, which waits
        for its client outside the simulation."""
        clock = self._vm.clock
        if clock is None:
            await self._hold(held, None)
            return
        async with clock.running(name=f"holder{held.id}"):
            await self._hold(held, clock)

    async def _hold(self, held: HeldInvalidation, clock) -> None:
        vm = self._vm
        try:
            await vm.notifier.invalidate_range_start(*held.notified)
        except VmBugged as bug:             # begin() reports it
            vm.mark_dead(bug)
            del self._held[held.id]
            held.started.set_exception(bug)
            return
        held.started.set_result(None)
        try:
            async with asyncio.timeout_at(held.deadline):
                if clock is None:
                    await held.released()
                else:
                    await clock.outside(held.released())
        except TimeoutError:
            if held.state is HoldState.HELD:  # a release may have come with the deadline
                held.release(HoldState.LEASE_EXPIRED)
        self._record(held)
        try:
            await vm.notifier.invalidate_range_end(*held.notified)
        except VmBugged as bug:             # whoever waits for the end gets it too
            vm.mark_dead(bug)
            raise

    def _record(self, held: HeldInvalidation) -> None:
        del self._held[held.id]
        self._ended.append(held.info())
        stat = _ENDED_STAT.get(held.state)
        if stat:
            setattr(self._vm.stat, stat, getattr(self._vm.stat, stat) + 1)
