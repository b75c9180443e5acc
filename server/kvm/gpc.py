"""gfn-to-pfn caches (GPC): KVM's own long-lived mappings of one guest page.

The parts of KVM that touch guest memory where they may not fault (Xen shared info and
event channels, steal time, kvmclock) hold a `gfn_to_pfn_cache` (reference §5): a gpa,
the uhva and memslot generation it resolved to, and the pfn the host maps there.

    INACTIVE --activate--> ACTIVE_INVALID <--invalidation, refresh starts-- ACTIVE_VALID
                                 |                                               ^
                                 +-----refresh: hva_to_pfn_retry succeeded-------+
    ACTIVE_INVALID, ACTIVE_VALID --deactivate--> INACTIVE

`active` gates refresh and `valid` gates use; both are read off the one state, so a cache
is never valid without being active.

Invariant (the sanitizers' `stale-gpc` oracle): a valid cache maps the pfn the host maps
at its uhva now, and no invalidation in flight covers its page. Invalidation keeps it by
clearing `valid` at the top of invalidate_range_start, before mmu_lock is taken (the sweep,
a notifier start hook); refresh keeps it with the `hva_to_pfn_retry` loop, which sets
`valid` only when the VM's retry policy shows that no invalidation of the page overlapped
the pfn lookup:

- `global` (mainline KVM): wait until `mn_active_invalidate_count` is zero, snapshot
  `mmu_invalidate_seq`, look the pfn up; retry while the count is not zero or the
  sequence moved. Any invalidation of any range delays the refresh.
- `range` (Woodhouse's range-based check, in a per-cache form): wait until no in-flight
  invalidation overlaps the cache's page, snapshot the cache's own `invalidate_seq` (which
  every sweep that covers the page bumps, valid or not), look the pfn up; retry while that
  sequence moved or an invalidation of the page is in flight. Others go unnoticed.

docs/gpc.md argues why both are safe. KVM's `gpc->lock` is the event loop here: check,
use and the sweep are synchronous, so no invalidation can fall between a user's check and
its read; `refresh_lock` serializes refresh, activate and deactivate as KVM's mutex does.
"""

from __future__ import annotations

import enum
import errno
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .clock import Mutex, simulated
from .errors import KvmError, NoSuchObject, VmBugged, einval
from .mmu_lock import LockAssertion
from .types import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .memslots import Memslot
    from .vm import Vm

__all__ = ["Gpc", "GpcInfo", "GpcState", "Gpcs", "GPC_POLICIES", "MAX_GPCS"]

MAX_GPCS = 256          # caches per VM


class GpcState(enum.Enum):
    INACTIVE = "inactive"
    ACTIVE_INVALID = "active-invalid"
    ACTIVE_VALID = "active-valid"


_TRANSITIONS = frozenset({
    (GpcState.INACTIVE, GpcState.ACTIVE_INVALID),        # activate
    (GpcState.ACTIVE_INVALID, GpcState.ACTIVE_VALID),    # refresh: no invalidation raced
    (GpcState.ACTIVE_VALID, GpcState.ACTIVE_INVALID),    # invalidation; refresh starts over
    (GpcState.ACTIVE_INVALID, GpcState.INACTIVE),        # deactivate
    (GpcState.ACTIVE_VALID, GpcState.INACTIVE),          # deactivate
})


@dataclass(frozen=True)
class GpcInfo:
    """A snapshot of one cache. `uhva` is None until a gpa resolved to one (KVM's
    KVM_HVA_ERR_BAD), `pfn` None while no pfn is held (KVM_PFN_ERR_FAULT)."""

    id: int
    gpa: int
    uhva: int | None
    pfn: int | None
    state: GpcState
    generation: int             # memslot generation when the gpa was resolved to uhva
    refreshes: int              # hva_to_pfn_retry loops completed
    retries: int                # lookups thrown away because an invalidation raced them
    wait_ns: int                # time refresh spent waiting for invalidations to end

    @property
    def active(self) -> bool:
        return self.state is not GpcState.INACTIVE

    @property
    def valid(self) -> bool:
        return self.state is GpcState.ACTIVE_VALID


# -- refresh's retry policies -----------------------------------------------------------
#
# A policy says which invalidations in flight matter to a cache, how to wait for them to
# end, and which sequence moves when one has run. Refresh retries while one is in flight
# or the sequence moved since its snapshot.

class _GlobalRetry:
    """`mmu_notifier_retry_cache`: every invalidation matters."""

    name = "global"

    def in_flight(self, gpc: "Gpc") -> bool:
        return gpc.vm.notifier.mn_active_invalidate_count != 0

    async def wait(self, gpc: "Gpc") -> None:
        await gpc.vm.notifier.wait_idle()

    def seq(self, gpc: "Gpc") -> int:
        return gpc.vm.notifier.mmu_invalidate_seq


class _RangeRetry:
    """Only invalidations that overlap the cache's page matter."""

    name = "range"

    def in_flight(self, gpc: "Gpc") -> bool:
        return gpc.vm.notifier.invalidating(*gpc.page_range())

    async def wait(self, gpc: "Gpc") -> None:
        await gpc.vm.notifier.wait_hva_idle(*gpc.page_range())

    def seq(self, gpc: "Gpc") -> int:
        return gpc.invalidate_seq


_POLICIES = {policy.name: policy for policy in (_GlobalRetry(), _RangeRetry())}
GPC_POLICIES = tuple(_POLICIES)


def _check_range(gpa: int, length: int) -> None:
    if gpa < 0 or length < 1:
        raise einval(f"gpa {gpa:#x} with length {length} is not a guest range")
    if (gpa & ~PAGE_MASK) + length > PAGE_SIZE:
        raise einval(f"[{gpa:#x}, {gpa + length:#x}) crosses a page boundary")


class Gpc:
    """One `gfn_to_pfn_cache` of a VM. Made by `Gpcs.create`."""

    def __init__(self, gpcs: "Gpcs", gpc_id: int) -> None:
        self._gpcs = gpcs
        self.vm = gpcs.vm
        self.id = gpc_id
        self.state = GpcState.INACTIVE
        self.gpa = 0
        self.uhva: int | None = None
        self.memslot: Memslot | None = None
        self.generation = -1
        self.pfn: int | None = None
        self.invalidate_seq = 0            # sweeps that covered the page (range policy)
        self.clock = gpcs.vm.clock
        self.refresh_lock = Mutex(self.clock)
        self.refreshes = self.retries = self.wait_ns = 0

    def __repr__(self) -> str:
        return f"Gpc(id={self.id}, gpa={self.gpa:#x}, {self.state.value})"

    @property
    def active(self) -> bool:
        return self.state is not GpcState.INACTIVE

    @property
    def valid(self) -> bool:
        return self.state is GpcState.ACTIVE_VALID

    def page_range(self) -> tuple[int, int]:
        page = self.uhva & PAGE_MASK
        return page, page + PAGE_SIZE

    def _move(self, to: GpcState, why: str) -> None:
        if (self.state, to) not in _TRANSITIONS:
            raise VmBugged(f"gpc {self.id}: {why} cannot move it from {self.state.value} "
                           f"to {to.value}")
        self.state = to

    # -- the user's calls ---------------------------------------------------------------

    @simulated("gpc")
    async def activate(self, gpa: int, length: int) -> None:
        """`kvm_gpc_activate`: join the VM's list of active caches, then refresh at gpa.

        EINVAL if [gpa, gpa + length) crosses a page, EFAULT if no memslot maps gpa; both
        are found before anything changes. A refresh that fails later (the host maps
        nothing writable at the uhva: EFAULT) leaves the cache active-invalid, as KVM's.
        """
        self.vm.check_alive()
        _check_range(gpa, length)
        self._memslot_for(gpa)
        async with self.refresh_lock:
            if self.state is GpcState.INACTIVE:
                # On the list before it can become valid: a sweep always sees it.
                self._gpcs.active.append(self)
                self._move(GpcState.ACTIVE_INVALID, "activate")
            await self._refresh(gpa, length)

    def check(self, length: int) -> bool:
        """`kvm_gpc_check`: may [gpa, gpa + length) be used through the cache now?
        False when it is not valid, the memslots changed since it resolved its uhva, or
        the range would cross the page; the user then refreshes."""
        self.vm.check_alive()
        if not (self.state is GpcState.ACTIVE_VALID
                and self.generation == self.vm.memslot_sets[0].generation
                and 0 <= length and (self.uhva & ~PAGE_MASK) + length <= PAGE_SIZE):
            return False
        self._oracle()
        return True

    @simulated("gpc")
    async def refresh(self, length: int) -> None:
        """`kvm_gpc_refresh`: make the cache valid for [gpa, gpa + length) again.

        EINVAL for an inactive cache or a range that crosses the page; EFAULT when no
        memslot maps the gpa any more or the host maps nothing writable at the uhva (the
        cache is left active-invalid). Waits while invalidations that the policy says
        matter are in flight; a cancelled refresh leaves the cache active-invalid.
        """
        self.vm.check_alive()
        async with self.refresh_lock:
            await self._refresh(self.gpa, length)

    @simulated("gpc")
    async def deactivate(self) -> None:
        """`kvm_gpc_deactivate`: leave the list, drop the pfn; gpa and uhva stay (the
        generation guards them). Nothing happens to an inactive cache."""
        async with self.refresh_lock:
            self._deactivate()

    def read(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at gpa + offset from the cached pfn (the user's `khva`).
        EINVAL if that crosses the page; EAGAIN when `check` fails: refresh, then retry."""
        self._use(offset, length)
        return self.vm.host.read_pfn(self.pfn, (self.uhva & ~PAGE_MASK) + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at gpa + offset into the cached pfn and mark the page dirty in its
        memslot, as KVM's users do after writing through a cache. Errors as `read`."""
        self._use(offset, len(data))
        self.vm.host.write_pfn(self.pfn, (self.uhva & ~PAGE_MASK) + offset, data)
        self.vm.mark_page_dirty(self.memslot, self.gpa >> PAGE_SHIFT)

    def info(self) -> GpcInfo:
        return GpcInfo(self.id, self.gpa, self.uhva, self.pfn, self.state, self.generation,
                       self.refreshes, self.retries, self.wait_ns)

    def _use(self, offset: int, length: int) -> None:
        self.vm.check_alive()
        if offset < 0 or length < 0 or (self.gpa & ~PAGE_MASK) + offset + length > PAGE_SIZE:
            raise einval(f"{length} bytes at offset {offset} from gpa {self.gpa:#x} are not "
                         "in its page")
        if self.check(offset + length):
            return
        why = self.state.value
        if self.valid:
            why += (f" but resolved under memslot generation {self.generation}, now "
                    f"{self.vm.memslot_sets[0].generation}")
        raise KvmError(errno.EAGAIN, f"gpc {self.id} is {why}: refresh it first")

    # -- refresh: refresh_lock held ------------------------------------------------------

    async def _refresh(self, gpa: int, length: int) -> None:
        """`__kvm_gpc_refresh`: resolve gpa to uhva again if it or the memslots changed,
        and the pfn if the cache is not valid or its page moved."""
        if not self.refresh_lock.locked():
            raise LockAssertion("gpc refresh_lock must be held here")
        _check_range(gpa, length)
        if not self.active:
            raise einval(f"gpc {self.id} is {self.state.value}: activate it before a refresh")
        old_page = None if self.uhva is None else self.uhva & PAGE_MASK
        slots = self.vm.memslot_sets[0]
        if gpa != self.gpa or self.generation != slots.generation or self.uhva is None:
            self.gpa, self.generation = gpa, slots.generation
            try:
                self.memslot = self._memslot_for(gpa)
            except KvmError:
                self.uhva = self.memslot = None
                self._fail(errno.EFAULT)
                raise
            self.uhva = self.memslot.gfn_to_hva(gpa >> PAGE_SHIFT) + (gpa & ~PAGE_MASK)
        if self.valid and self.uhva & PAGE_MASK == old_page:
            return                              # still mapped: only the offset moved
        try:
            await self._hva_to_pfn_retry()
        except KvmError as error:
            self._fail(error.errno)
            raise
        except BaseException:
            self._fail(errno.EINTR)
            raise

    async def _hva_to_pfn_retry(self) -> None:
        """`hva_to_pfn_retry`: look the pfn up until the policy says no invalidation of
        the page raced the lookup, then set valid."""
        vm = self.vm
        if self.valid:
            self._move(GpcState.ACTIVE_INVALID, "refresh")   # others' check fails now
        policy = self._gpcs.policy
        checked = "gpc_refresh_no_check" not in vm.knobs
        retries = 0
        while True:
            if checked and policy.in_flight(self):
                # A pfn looked up now would be thrown away: wait instead of spinning. The
                # range policy needs it besides: its snapshot must not predate a sweep
                # whose invalidation has not ended.
                start = self._now_ns()
                await policy.wait(self)
                waited = self._now_ns() - start
                self.wait_ns += waited
                vm.stat.gpc_refresh_wait_ns += waited
            seq = policy.seq(self)
            if self.clock is not None:
                self.clock.charge(self.clock.costs.gpc_refresh)
            await vm.sched.point("gpc.refresh_hva_to_pfn")     # the host may change the page
            pfn, _, _ = await vm.host.hva_to_pfn(self.uhva, True)
            await vm.sched.point("gpc.refresh_before_valid")   # ... or invalidate it now
            if not checked or not (policy.in_flight(self) or policy.seq(self) != seq):
                break
            retries += 1
        self.pfn = pfn
        self._move(GpcState.ACTIVE_VALID, "refresh")
        self.refreshes += 1
        self.retries += retries
        vm.stat.gpc_refreshes += 1
        vm.stat.gpc_refresh_retries += retries
        if vm.tracer.on:
            vm.tracer.emit("gpc_refresh", gpc=self.id, result="valid", retries=retries)
        if self.generation == vm.memslot_sets[0].generation:
            self._oracle()      # a cache of an older generation is unusable: check fails

    def _now_ns(self) -> int:
        """Wall ns, or the refresher's virtual ns in virtual time."""
        return self.clock.time() if self.clock is not None else time.perf_counter_ns()

    def _fail(self, errno_value: int) -> None:
        if self.valid:
            self._move(GpcState.ACTIVE_INVALID, "a failed refresh")
        self.pfn = None
        if self.vm.tracer.on:
            self.vm.tracer.emit("gpc_refresh", gpc=self.id,
                                result=errno.errorcode.get(errno_value, str(errno_value)),
                                retries=0)

    def _memslot_for(self, gpa: int) -> "Memslot":
        slot = self.vm.memslot_sets[0].lookup(gpa >> PAGE_SHIFT)
        if slot is None or slot.invalid:
            raise KvmError(errno.EFAULT, f"no memslot maps gpa {gpa:#x}")
        return slot

    def _deactivate(self) -> None:
        if not self.active:
            return
        self._move(GpcState.INACTIVE, "deactivate")
        self._gpcs.active.remove(self)
        self.pfn = None

    def _oracle(self) -> None:
        sanitizers = self.vm.sanitizers
        if sanitizers is None:
            return
        try:
            sanitizers.check_gpc(self.id, self.gpa, self.uhva, self.pfn)
        except VmBugged as bug:
            self.vm.mark_dead(bug)
            raise


class Gpcs:
    """A VM's caches: by id (how the RPC layer names them), and `active`, KVM's
    `gpc_list`, the ones every invalidation sweeps."""

    def __init__(self, vm: "Vm", policy: str) -> None:
        self.vm = vm                             # policy: checked by VmConfig.validate
        self.policy = _POLICIES[policy]
        self.active: list[Gpc] = []
        self._by_id: dict[int, Gpc] = {}
        self._ids = itertools.count(1)

    async def create(self, gpa: int, length: int) -> Gpc:
        """A new cache, activated at gpa (`kvm_gpc_init` + `kvm_gpc_activate`). If the
        activation fails the cache is gone again: nothing changed. ENOSPC beyond
        MAX_GPCS caches."""
        self.vm.check_alive()
        if len(self._by_id) >= MAX_GPCS:
            raise KvmError(errno.ENOSPC, f"VM {self.vm.id} has {MAX_GPCS} gfn-to-pfn "
                           "caches already")
        gpc = Gpc(self, next(self._ids))
        try:
            await gpc.activate(gpa, length)
        except BaseException:
            gpc._deactivate()                  # nobody else knows it: no refresh can run
            raise
        self._by_id[gpc.id] = gpc
        return gpc

    def get(self, gpc_id: int) -> Gpc:
        self.vm.check_alive()
        try:
            return self._by_id[gpc_id]
        except KeyError:
            raise NoSuchObject(f"VM {self.vm.id} has no gfn-to-pfn cache {gpc_id}") from None

    async def deactivate(self, gpc_id: int) -> GpcInfo:
        """Deactivate the cache and forget it, as a user freeing its cache would; returns
        its last state (inactive)."""
        gpc = self.get(gpc_id)
        await gpc.deactivate()
        self._by_id.pop(gpc_id, None)
        return gpc.info()

    def infos(self) -> list[GpcInfo]:
        return [gpc.info() for gpc in self._by_id.values()]

    def invalidate_start(self, start: int, end: int) -> None:
        """`gfn_to_pfn_cache_invalidate_start`, a notifier start hook: for every
        invalidation, memslot or not, before mmu_lock is taken. Each active cache whose
        page overlaps [start, end) counts the sweep and stops being valid."""
        vm = self.vm
        if vm.mmu_lock.held_for_write():
            raise LockAssertion("the GPC sweep runs before mmu_lock is taken")
        for gpc in self.active:
            if gpc.uhva is None:
                continue
            page_start, page_end = gpc.page_range()
            if not (start < page_end and page_start < end):
                continue
            gpc.invalidate_seq += 1
            if gpc.valid:
                gpc._move(GpcState.ACTIVE_INVALID, "invalidation")
                vm.stat.gpc_invalidations += 1
                if vm.tracer.on:
                    vm.tracer.emit("gpc_invalidate", gpc=gpc.id, start=start, end=end)
