"""A VM: the facade the RPC layer talks to, and the owner of every per-VM structure.

Lifecycle: ALIVE -> DESTROYED (by `destroy`), or ALIVE -> DEAD when an invariant breaks
(`VmBugged`, KVM_BUG_ON): a dead VM answers EIO to everything but `destroy`.

Locks, outermost first: `slots_lock` (memslot updates) -> `mmu_lock`. The MMU notifier
never takes `slots_lock`; memslot publication waits for `mn_active_invalidate_count == 0`.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from . import aging, caps, dirty_log, host_ops
from . import spte as S
from .clock import VIRTUAL_TIME_LIMIT, Mutex, VirtualClock, simulated, simulated_sync
from .costs import Costs, check_costs
from .dirty_log import BYTE_IN_WORD
from .dirty_ring import DIRTY_GFN_BYTES, DirtyGfn, DirtyRing, check_ring_size
from .errors import KvmError, NoSuchObject, VmBugged, einval
from .gpc import GPC_POLICIES, Gpcs
from .guest_memfd import GuestMemfdInfo, GuestMemfds
from .held import HeldInvalidation, HeldInvalidationInfo, HeldInvalidations, HoldState
from .host_mm import HostMm, HostRegionInfo
from .host_region import is_zero_pfn
from .mem_attributes import MemoryAttributes, set_memory_attributes
from .memslots import (KVM_ADDRESS_SPACE_NUM, KVM_MEM_GUEST_MEMFD, KVM_MEMSLOT_INVALID, Memslot,
                       MemslotChange, MemslotInfo, Memslots, check_region)
from .mmu import can_be_fast_table
from .limits import NO_LIMITS, Limits, MemoryCharge
from .mmu_lock import MmuLock
from .notifier import Notifier
from .nx_recovery import NxRecoveryWorker, check_nx_recovery
from .rcu import Rcu
from .sanitizers import Sanitizers
from .sched import Scheduler
from .shadow_mmu import KVM_MIN_ALLOC_MMU_PAGES, ShadowMmu
from .stats import VmStats
from .tdp_mmu import TdpMmu
from .trace import Tracer
from .types import PAGE_SHIFT, Backing
from .vcpu import (KVM_REQ_DIRTY_RING_SOFT_FULL, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
                   KVM_REQ_TLB_FLUSH, KVM_REQ_VM_DEAD, Vcpu)

__all__ = ["Vm", "VmConfig", "VmInfo", "SpteInfo", "VmState", "KVM_MAX_VCPUS", "DEBUG_KNOBS",
           "check_debug_knobs", "CLOCKS", "POLICIES"]

KVM_MAX_VCPUS = 1024
HOST_MAXPHYADDR = 52

# Debug knobs: each switches one protection of the seeds off, so that schedule exploration
# can show the race it prevents (docs/explore.md).
DEBUG_KNOBS = frozenset({
    "skip_invalidate_retry",     # faults ignore mmu_invalidate_seq/in-progress (§4.5)
    "free_tables_immediately",   # unlinked page tables are freed without a grace period
    "skip_zap_tlb_flush",        # zaps do not flush remote TLBs
    "aging_without_rcu",         # lockless aging walks outside an RCU read-side section
    "gpc_refresh_no_check",      # GPC refresh sets valid without waiting or retrying (§5.4)
    "fast_pf_plain_write",       # the fast page fault stores its SPTE without a cmpxchg
    "skip_wrprot_flush",         # dirty-log write-protection does not flush TLBs
    # The legacy MMU's (shadow_mmu.py, rmap.py, rmap_aging.py):
    "rmap_walk_without_lock",    # lockless rmap aging reads heads without the read-only lock
    "lockless_age_access_track",  # lockless rmap aging marks A/D-off SPTEs for access tracking
    "free_sp_before_flush",      # zapped shadow pages are freed before the remote TLB flush
})

MMUS = ("tdp", "legacy")         # VmConfig.mmu: the TDP MMU, or KVM's MMU with tdp_mmu=0


def check_debug_knobs(knobs: Iterable[str]) -> None:
    """EINVAL naming the knobs that are not in DEBUG_KNOBS, if any."""
    unknown = set(knobs) - DEBUG_KNOBS
    if unknown:
        raise einval(f"unknown debug knobs {sorted(unknown)}; known: {sorted(DEBUG_KNOBS)}")


CLOCKS = ("wall", "virtual")
# The designs the seeds compare, each a legitimate MMU (docs/virtual-time.md):
POLICIES = {
    "fault_lock": ("read", "write"),          # faults under mmu_lock held for read or write
    "table_free": ("rcu", "write_section"),   # unlinked tables: after a grace period, or
                                              # at the end of a shared section, inside a
                                              # short write-side critical section (seed 002)
    "aging_lock": ("none", "read", "write"),  # aging: lockless, or under mmu_lock
}


def _sanitizers_default() -> bool:
    return os.environ.get("VMMU_SANITIZERS", "") not in ("", "0")


_BIT_IN_BYTE = tuple(1 << bit for bit in range(8))
_LOCK_STATS = ("read_acquisitions", "write_acquisitions", "read_contended", "write_contended",
               "read_wait_ns", "write_wait_ns", "read_hold_ns", "write_hold_ns")    # a tuple lookup costs less than a shift


@dataclass(frozen=True)
class VmConfig:
    max_vcpus: int = 8
    tdp_levels: int = 4          # 4-level EPT (48-bit gpa) or 5-level (52-bit, host-limited)
    ad_bits: bool = True         # EPT Accessed/Dirty bits
    name: str = ""
    schedule_seed: int | None = None   # deterministic schedule: a seeded choice at each point
    sanitizers: bool = field(default_factory=_sanitizers_default)   # oracles, use-after-free
    debug: frozenset[str] = frozenset()  # protections switched off (DEBUG_KNOBS)
    gpc_policy: str = "global"   # what makes GPC refresh retry: "global" or "range" (gpc.py)
    fast_page_fault: bool = True  # fix write-protection and access tracking without mmu_lock
    mmu: str = "tdp"             # "tdp" (tdp_mmu.py) or "legacy" (shadow_mmu.py: rmaps)
    # Dirty logging (dirty_log.py): split huge pages when logging is enabled (KVM's
    # eager_page_split); KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits (1 ENABLE, 2 INITIALLY_SET);
    # per-vCPU dirty rings of this many bytes (0: none, KVM_CAP_DIRTY_LOG_RING), with a
    # bitmap beside them (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) for writes without a vCPU.
    eager_page_split: bool = True
    manual_dirty_log_protect: int = 0
    dirty_ring_size: int = 0
    dirty_ring_with_bitmap: bool = False
    # Time (clock.py): "wall", or "virtual" with the cost table's defaults overridden by
    # `costs` (name -> ns). Policies: POLICIES; zap_leafs_only off is the MMU notifier's
    # zap before seed 001 (tables whose whole span is inside the range go too).
    clock: str = "wall"
    costs: tuple[tuple[str, int], ...] = ()
    fault_lock: str = "read"
    table_free: str = "rcu"
    aging_lock: str = "none"
    zap_leafs_only: bool = True
    # KVM's nx_huge_pages (the iTLB multihit mitigation, nx_huge_pages.py): huge leaves are
    # not executable and a fetch maps 4K. Off, as KVM's "auto" on a CPU without the bug.
    nx_huge_pages: bool = False
    # KVM's recovery worker (nx_recovery.py): 1/ratio of the possible NX huge pages every
    # period_ms (0: one hour / ratio), from the first KVM_RUN; ratio 0 (the default): none.
    nx_huge_pages_recovery_ratio: int = 0
    nx_huge_pages_recovery_period_ms: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.costs, dict):       # a mapping is welcome; kept as sorted pairs
            object.__setattr__(self, "costs", tuple(sorted(self.costs.items())))

    def validate(self) -> None:
        if not 1 <= self.max_vcpus <= KVM_MAX_VCPUS:
            raise einval(f"max_vcpus {self.max_vcpus} is not in 1..{KVM_MAX_VCPUS}")
        if self.tdp_levels not in (4, 5):
            raise einval(f"tdp_levels {self.tdp_levels} is not 4 or 5")
        check_debug_knobs(self.debug)
        if self.schedule_seed is not None and not 0 <= self.schedule_seed < 1 << 64:
            raise einval(f"schedule_seed {self.schedule_seed} is not a u64")
        if self.mmu not in MMUS:
            raise einval(f"mmu {self.mmu!r} is not one of {', '.join(MMUS)}")
        if self.gpc_policy not in GPC_POLICIES:
            raise einval(f"gpc_policy {self.gpc_policy!r} is not one of "
                         f"{', '.join(GPC_POLICIES)}")
        dirty_log.check_manual_protect(self.manual_dirty_log_protect)
        if self.dirty_ring_size:
            check_ring_size(self.dirty_ring_size)
        elif self.dirty_ring_with_bitmap:
            raise einval("dirty_ring_with_bitmap needs a dirty ring (dirty_ring_size)")
        if self.clock not in CLOCKS:
            raise einval(f"clock {self.clock!r} is not one of {', '.join(CLOCKS)}")
        if self.costs and self.clock != "virtual":
            raise einval("costs need a VM in virtual time (clock 'virtual')")
        check_costs(dict(self.costs))
        for policy, choices in POLICIES.items():
            if getattr(self, policy) not in choices:
                raise einval(f"{policy} {getattr(self, policy)!r} is not one of "
                             f"{', '.join(choices)}")
        if self.mmu == "legacy" and (self.table_free != "rcu" or not self.zap_leafs_only):
            raise einval("table_free and zap_leafs_only are policies of the TDP MMU; the "
                         "legacy MMU frees on commit and zaps leafs only")
        check_nx_recovery(self)
        if self.table_free == "write_section" and (self.fast_page_fault or
                                                   self.aging_lock == "none"):
            # The exclusive section waits out mmu_lock's holders, not lockless walkers.
            raise einval("table_free 'write_section' frees tables that lockless walkers "
                         "may hold: it needs fast_page_fault off and aging under mmu_lock")

    @property
    def gpa_bits(self) -> int:
        return min(HOST_MAXPHYADDR, 12 + 9 * self.tdp_levels)


@dataclass(frozen=True)
class VmInfo:
    id: int
    name: str
    config: VmConfig
    nr_vcpus: int
    nr_memslots: int
    nr_host_regions: int
    dead: bool


@dataclass(frozen=True)
class SpteInfo:
    level: int
    gfn: int
    index: int
    spte: int
    kind: str
    pfn: int
    readable: bool
    writable: bool
    executable: bool
    large: bool
    accessed: bool
    dirty: bool
    host_writable: bool
    mmu_writable: bool
    zero_page: bool = False      # a leaf of the zero page (or the huge zero page)


class VmState(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    DESTROYED = "destroyed"


_ALIVE = VmState.ALIVE


class Vm:
    def __init__(self, vm_id: int, config: VmConfig, limits: Limits = NO_LIMITS,
                 server_mapped: MemoryCharge | None = None,
                 server_populated: MemoryCharge | None = None) -> None:
        config.validate()
        self.id, self.config, self.limits = vm_id, config, limits
        self.state = VmState.ALIVE
        self.death: str = ""
        self.ad_enabled = config.ad_bits
        # The dirty-logging capabilities (caps.py): the configuration's, until
        # KVM_ENABLE_CAP changes them.
        self.manual_dirty_log_protect = config.manual_dirty_log_protect
        self.dirty_ring_size = config.dirty_ring_size
        self.dirty_ring_with_bitmap = config.dirty_ring_with_bitmap
        self.can_be_fast = can_be_fast_table(self)         # by the error code's bits
        # `kvm_mmu_max_gfn()`: the last gfn (inclusive) a memslot may hold and a fault may
        # map, from the guest physical address width; the one definition of the bound.
        self.max_gfn = (1 << (config.gpa_bits - PAGE_SHIFT)) - 1
        self.stat = VmStats()
        self.knobs = frozenset(config.debug)
        self.tracer = Tracer(vm_id)
        self.clock = VirtualClock(Costs(dict(config.costs)), config.schedule_seed or 0) \
            if config.clock == "virtual" else None
        self.sched = Scheduler(config.schedule_seed, self.clock)
        self.host = HostMm(MemoryCharge(limits, "vm_mapped_bytes", server_mapped),
                           MemoryCharge(limits, "vm_populated_bytes", server_populated))
        self.host.sched = self.sched
        self.host.clock = self.tracer.clock = self.clock
        self.sanitizers = Sanitizers(self) if config.sanitizers else None
        self.violation: VmBugged | None = None
        self.mmu_lock = MmuLock(lockdep=self.sanitizers is not None, clock=self.clock)
        self.rcu = Rcu(self.clock)
        self.slots_lock = Mutex(self.clock)
        self.memslot_sets = [Memslots(as_id) for as_id in range(KVM_ADDRESS_SPACE_NUM)]
        # The MMU: `tdp` is the TDP MMU, `shadow` the legacy one; `mmu` is whichever runs.
        self.tdp: TdpMmu | None = None
        self.shadow: ShadowMmu | None = None
        if config.mmu == "legacy":
            self.mmu = self.shadow = ShadowMmu(
                root_level=config.tdp_levels, max_gfn=self.max_gfn, ad_enabled=config.ad_bits,
                mmu_lock=self.mmu_lock, rcu=self.rcu, stats=self.stat,
                flush_remote_tlbs=self.flush_remote_tlbs, tracer=self.tracer,
                sched=self.sched, knobs=self.knobs, memslot_sets=self.memslot_sets)
            self.shadow.nx_huge_pages = config.nx_huge_pages
        else:
            self.mmu = self.tdp = TdpMmu(
                root_level=config.tdp_levels, max_gfn=self.max_gfn, ad_enabled=config.ad_bits,
                mmu_lock=self.mmu_lock, rcu=self.rcu, stats=self.stat,
                flush_remote_tlbs=self.flush_remote_tlbs, tracer=self.tracer)
            self.tdp.knobs, self.tdp.sched, self.tdp.clock = self.knobs, self.sched, self.clock
            self.tdp.policy(config)
        self.mmu.sanitizers = self.sanitizers
        self.notifier = Notifier(self)
        self.host.notifiers.append(self.notifier)
        self.holds = HeldInvalidations(self)
        self.gpcs = Gpcs(self, config.gpc_policy)
        self.nx_recovery = NxRecoveryWorker(self, config.nx_huge_pages_recovery_ratio,
                                            config.nx_huge_pages_recovery_period_ms) \
            if config.nx_huge_pages_recovery_ratio else None
        self.notifier.start_hooks.append(self.gpcs.invalidate_start)
        self._vcpus: dict[int, Vcpu] = {}
        # Private memory (guest_memfd.py, mem_attributes.py): every TDP-MMU VM is a
        # software-protected one (KVM_X86_SW_PROTECTED_VM needs tdp_mmu).
        self.has_private_mem = config.mmu == "tdp"
        self.mem_attributes = MemoryAttributes()
        self.gmems = GuestMemfds(self)

    # -- lifecycle --------------------------------------------------------------------

    def check_alive(self) -> None:
        if self.state is _ALIVE:
            return
        if self.state is VmState.DESTROYED:
            raise NoSuchObject(f"VM {self.id} was destroyed")
        if self.state is VmState.DEAD:
            raise KvmError(errno.EIO, f"VM {self.id} is dead: {self.death}")

    @property
    def destroyed(self) -> bool:
        return self.state is VmState.DESTROYED

    def mark_dead(self, bug: VmBugged) -> None:
        if self.state is VmState.ALIVE:
            death = str(bug)
            if self.sched.deterministic and "preemption points:" not in death:
                death += f"; preemption points: {self.sched.describe_trace() or '(none)'}"
            self.state, self.death, self.violation = VmState.DEAD, death, bug
            self._kick_vcpus_dead()

    async def destroy(self) -> None:
        """`kvm_destroy_vm`: no vCPU runs again; every SPTE and table goes. In virtual time
        the clock runs free from here on, so that nothing waits for a simulator's advance."""
        if self.state is VmState.DESTROYED:
            return
        self.state = VmState.DESTROYED
        self._kick_vcpus_dead()
        if self.clock is not None:
            self.clock.run_free()
        if self.nx_recovery is not None:
            await self.nx_recovery.stop()
        await self._teardown()

    @simulated("teardown")
    async def _teardown(self) -> None:
        await self.holds.release_all(HoldState.VM_DESTROYED)
        self.host.notifiers.remove(self.notifier)
        async with self.mmu_lock.write:
            # A vCPU inside KVM_RUN may be mid-fault on its root: it finds the root invalid
            # (RET_PF_RETRY), then KVM_REQ_VM_DEAD at its next entry, and drops the root as
            # it leaves KVM_RUN (in KVM no vCPU runs once kvm_destroy_vm can start).
            if self.shadow is not None:
                for vcpu in self._vcpus.values():
                    if not vcpu.running:
                        vcpu.release_root()
                await self.shadow.zap_all()
            else:
                roots = self.tdp.invalidate_all_roots()
                for vcpu in self._vcpus.values():
                    if not vcpu.running:
                        vcpu.release_root()
                await self.tdp.teardown(roots)
        await self.rcu.barrier()
        self.tracer.close()
        self._release_memory()

    def _release_memory(self) -> None:
        """Drop the memory a destroyed VM held (host pages, dirty bitmaps, TLBs) now,
        rather than when the cyclic GC reaches the VM's objects, and charge it back."""
        for slots in self.memslot_sets:
            for slot in list(slots):
                slots.replace(slot, None)
        self.gmems.release()
        self.host.release()
        for vcpu in self._vcpus.values():
            vcpu.flush_tlb()

    def _kick_vcpus_dead(self) -> None:
        """`KVM_REQ_VM_DEAD` to every vCPU: one inside KVM_RUN leaves at its next entry."""
        for vcpu in self._vcpus.values():
            vcpu.make_request(KVM_REQ_VM_DEAD)

    def info(self) -> VmInfo:
        """The configuration in it has the capabilities as enabled now."""
        config = dataclasses.replace(
            self.config, manual_dirty_log_protect=self.manual_dirty_log_protect,
            dirty_ring_size=self.dirty_ring_size,
            dirty_ring_with_bitmap=self.dirty_ring_with_bitmap)
        return VmInfo(self.id, self.config.name, config, len(self._vcpus),
                      sum(len(s) for s in self.memslot_sets), len(self.host.regions()),
                      self.state is VmState.DEAD)

    # -- virtual time (clock.py) -------------------------------------------------------

    def virtual_clock(self) -> VirtualClock:
        """The VM's clock; EOPNOTSUPP for a VM in wall time."""
        if self.clock is None:
            raise KvmError(errno.EOPNOTSUPP, f"VM {self.id} runs in wall time: it has no "
                           "virtual clock (create it with clock 'virtual')")
        return self.clock

    def virtual_now(self) -> int:
        """The VM's virtual now, in ns: the time of the latest event it simulated."""
        self.check_alive()
        return self.virtual_clock().now

    async def advance(self, until_ns: int) -> int:
        """Run the VM's simulation up to virtual time `until_ns` (and, from now on, never
        past the latest such time); returns the new virtual now."""
        self.check_alive()
        clock = self.virtual_clock()
        if not 0 <= until_ns < VIRTUAL_TIME_LIMIT:
            raise einval(f"until_ns {until_ns} is not in [0, 2^63) ns")
        return await clock.advance(until_ns)

    # -- host memory (the VMM's own mm) ---------------------------------------------

    def mmap(self, size: int, backing: Backing, *, writable: bool = True,
             hva: int | None = None) -> HostRegionInfo:
        self.check_alive()
        return self.host.mmap(size, backing, writable=writable, hva=hva).info()

    @simulated("invalidator")
    async def munmap(self, hva: int, size: int) -> None:
        self.check_alive()
        await self.host.munmap(hva, size)

    def host_regions(self) -> list[HostRegionInfo]:
        return [region.info() for region in self.host.regions()]

    @simulated("vmm")
    async def read_hva(self, hva: int, length: int) -> bytes:
        """Read as the VMM would (populates, as touching the memory does)."""
        self.check_alive()
        self.limits.check_response(length, f"reading {length} bytes")
        return await self.host.read(hva, length)

    @simulated("vmm")
    async def write_hva(self, hva: int, data: bytes) -> None:
        """Write as the VMM would; a KSM page in the range breaks copy-on-write first."""
        self.check_alive()
        await self.host.write(hva, data)

    # -- memslots ---------------------------------------------------------------------

    @simulated("vmm")
    async def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                                     memory_size: int, userspace_addr: int,
                                     guest_memfd: int = 0, guest_memfd_offset: int = 0
                                     ) -> None:
        """`KVM_SET_USER_MEMORY_REGION2`: create, delete (size 0), move or change flags; a
        slot created with KVM_MEM_GUEST_MEMFD binds [guest_memfd_offset, + memory_size) of
        the guest_memfd `guest_memfd` (the two are ignored without the flag)."""
        self.check_alive()
        self.limits.check("memslot_bytes", memory_size, f"a memslot of {memory_size:#x} "
                          "bytes", errno.E2BIG)
        async with self.slots_lock:
            change, old, new = check_region(self.memslot_sets, slot, flags, guest_phys_addr,
                                            memory_size, userspace_addr, self.max_gfn,
                                            guest_memfd_offset, self.has_private_mem)
            if change is None:
                return
            if new is not None and flags & KVM_MEM_GUEST_MEMFD:     # a CREATE: immutable
                gmem = self.gmems.get(guest_memfd)
                gmem.check_bind(guest_memfd_offset, new.npages)
                new = new.copy(gmem=gmem, gmem_pgoff=guest_memfd_offset >> PAGE_SHIFT)
                await gmem.bind(new)
            if change in (MemslotChange.DELETE, MemslotChange.MOVE):
                invalid = old.copy(flags=old.flags | KVM_MEMSLOT_INVALID)
                await self._publish(old, invalid)
                await self._zap_all_fast()
                old = invalid
            dirty_log.prepare_memslot(self, old, new)
            if self.shadow is not None:
                self.shadow.prepare_memslot(old, new)
            await self._publish(old, new)
            with self._dies_on_bug():
                await dirty_log.commit_memslot(self, change, old, new)
            if change is MemslotChange.DELETE and old.gmem is not None:
                await old.gmem.unbind(old)

    async def _publish(self, old: Memslot | None, new: Memslot | None) -> None:
        """`kvm_swap_active_memslots`: wait out MMU-notifier invalidations, then swap."""
        await self.notifier.wait_idle()
        self.memslot_sets[(new or old).as_id].replace(old, new)

    async def _zap_all_fast(self) -> None:
        """`kvm_mmu_zap_all_fast`: invalidate every root under the write lock, then zap
        the old roots under the read lock while vCPUs fault into fresh ones. The legacy
        MMU zaps its obsolete pages under the write lock, yielding it between batches."""
        if self.shadow is not None:
            async with self.mmu_lock.write:
                for vcpu in self._vcpus.values():
                    vcpu.make_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
                with self._dies_on_bug():
                    await self.shadow.zap_all_fast()
            return
        async with self.mmu_lock.write:
            roots = self.tdp.invalidate_all_roots()
            for vcpu in self._vcpus.values():
                vcpu.make_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        async with self.mmu_lock.read:
            await self.tdp.zap_invalidated_roots(roots)

    def memslots(self) -> list[MemslotInfo]:
        return [slot.info() for slots in self.memslot_sets for slot in slots]

    # -- private memory: guest_memfd (guest_memfd.py) and attributes (mem_attributes.py)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfdInfo:
        """KVM_CREATE_GUEST_MEMFD: a guest_memfd of `size` bytes (its `fd` in the info)."""
        self.check_alive()
        return self.gmems.create(size, flags).info()

    @simulated("vmm")
    async def guest_memfd_fallocate(self, fd: int, mode: int, offset: int,
                                    length: int) -> None:
        """fallocate(2) on a guest_memfd: KEEP_SIZE allocates the range's pages;
        KEEP_SIZE|PUNCH_HOLE invalidates the mappings of the range and frees its pages."""
        self.check_alive()
        gmem = self.gmems.get(fd)
        with self._dies_on_bug():
            await gmem.fallocate(mode, offset, length)

    def guest_memfds(self) -> list[GuestMemfdInfo]:
        self.check_alive()
        return self.gmems.infos()

    @simulated("vmm")
    async def set_memory_attributes(self, address: int, size: int, attributes: int,
                                    flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES of gpa [address, address + size): attributes
        KVM_MEMORY_ATTRIBUTE_PRIVATE (8) makes the range private, 0 shared."""
        self.check_alive()
        with self._dies_on_bug():
            await set_memory_attributes(self, address, size, attributes, flags)

    def private_ranges(self) -> list[tuple[int, int]]:
        """The private gpa ranges [start, end), in order (no KVM ioctl reads them back)."""
        self.check_alive()
        return [(start << PAGE_SHIFT, end << PAGE_SHIFT)
                for start, end in self.mem_attributes.ranges()]

    # -- client-held MMU-notifier invalidations (held.py) ------------------------------

    @simulated("holder")
    async def begin_invalidation(self, start: int, end: int, lease_s: float) -> int:
        """Invalidate hva [start, end) as the host mm would and hold it until
        `end_invalidation(id)` or for `lease_s` seconds at most; returns the hold's id once
        the range is zapped and flushed."""
        self.check_alive()
        self._check_holds()
        return (await self.holds.begin(start, end, lease_s)).id

    @simulated("holder")
    async def end_invalidation(self, invalidation_id: int) -> None:
        """End a hold: after this, faults in the range map it again."""
        self.check_alive()
        await self.holds.end(invalidation_id)

    def hold_invalidation(self, start: int, end: int
                          ) -> AbstractAsyncContextManager[HeldInvalidation]:
        """`async with vm.hold_invalidation(start, end) as held:` holds the invalidation
        while the body runs; a cancelled body releases it as CLIENT_GONE."""
        self.check_alive()
        self._check_holds()
        return self.holds.hold(start, end)

    def _check_holds(self) -> None:
        held = len(self.holds.held())
        self.limits.check("holds", held + 1, f"a hold beyond the {held} held")

    def held_invalidations(self) -> list[HeldInvalidationInfo]:
        return self.holds.held()

    def ended_invalidations(self) -> list[HeldInvalidationInfo]:
        """How the latest holds ended, oldest first."""
        return self.holds.ended()

    # -- vCPUs ------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        self.check_alive()
        if not 0 <= vcpu_id < self.config.max_vcpus:
            raise einval(f"vCPU id {vcpu_id} is not below max_vcpus "
                         f"({self.config.max_vcpus})")
        if vcpu_id in self._vcpus:
            raise KvmError(errno.EEXIST, f"vCPU {vcpu_id} exists")
        vcpu = self._vcpus[vcpu_id] = Vcpu(self, vcpu_id)
        ring_size = self.dirty_ring_size
        vcpu.dirty_ring = DirtyRing(ring_size // DIRTY_GFN_BYTES) if ring_size else None
        return vcpu

    def vcpu(self, vcpu_id: int) -> Vcpu:
        self.check_alive()
        try:
            return self._vcpus[vcpu_id]
        except KeyError:
            raise NoSuchObject(f"VM {self.id} has no vCPU {vcpu_id}") from None

    def vcpus(self) -> list[Vcpu]:
        return list(self._vcpus.values())

    def flush_remote_tlbs(self) -> None:
        """`kvm_flush_remote_tlbs`: every vCPU flushes before it next uses its TLB."""
        self.stat.remote_tlb_flush_requests += 1
        if self.tracer.on:
            self.tracer.emit("kvm_tlb_flush", vcpus=len(self._vcpus))
        for vcpu in self._vcpus.values():
            vcpu.make_request(KVM_REQ_TLB_FLUSH)
        if self._vcpus:
            self.stat.remote_tlb_flush += 1
        if self.clock is not None:
            self._flush_ipis(self.clock)

    def _flush_ipis(self, clock: VirtualClock) -> None:
        """A remote flush in virtual time: an IPI to each vCPU in guest mode, each of which
        exits, flushes and acknowledges; the flusher waits for the acknowledgements (one
        round trip after the last IPI is sent)."""
        costs = clock.costs
        me = clock.current
        targets = [vcpu.actor for vcpu in self._vcpus.values()
                   if vcpu.in_guest() and vcpu.actor is not me]
        if not targets:
            return
        clock.charge(costs.ipi_send * len(targets))
        for actor in targets:
            clock.bill(actor, costs.ipi_receive)
        if me is not None:
            me.time += costs.ipi_receive          # waiting for the acknowledgements
            me.wait_ns += costs.ipi_receive

    def mark_page_dirty(self, slot: Memslot, gfn: int, vcpu: Vcpu | None = None) -> None:
        """`mark_page_dirty_in_slot`: record gfn as dirty if the slot logs: in the ring of
        `vcpu` (the vCPU that dirtied it) when the VM has dirty rings, else in the slot's
        bitmap. Callers: a writable SPTE created in the slot, the fast page fault setting
        W, KVM's own writes (a GPC user's: no vCPU, so with rings only the bitmap beside
        them records it, and without one nothing does, as on x86)."""
        if not slot.dirty_logging:
            return
        offset = gfn - slot.base_gfn
        ring = vcpu.dirty_ring if vcpu is not None else None
        clock = self.clock
        if clock is not None:
            clock.charge(clock.costs.ring_push if ring is not None else
                         clock.costs.dirty_bitmap_set)
        if ring is not None:
            if ring.push(slot.as_id << 16 | slot.id, offset):
                vcpu.make_request(KVM_REQ_DIRTY_RING_SOFT_FULL)
            if self.tracer.on:
                self.tracer.emit("kvm_dirty_ring_push", vcpu=vcpu.id,
                                 slot=slot.as_id << 16 | slot.id, offset=offset)
        elif slot.dirty_bitmap is not None:
            slot.dirty_bitmap.bytes[offset >> 3 ^ BYTE_IN_WORD] |= _BIT_IN_BYTE[offset & 7]

    # -- dirty logging (dirty_log.py) -------------------------------------------------

    @simulated("vmm")
    async def enable_cap(self, cap: int, flags: int = 0, args: Sequence[int] = ()) -> None:
        """KVM_ENABLE_CAP on the VM: the dirty-logging capabilities (caps.py)."""
        self.check_alive()
        await caps.enable_cap(self, cap, flags, args)

    # -- the NX huge page mitigation (nx_huge_pages.py) --------------------------------

    @simulated("nx_recovery")
    async def recover_nx_huge_pages(self, ratio: int) -> int:
        """One pass of `kvm_nx_huge_page_recovery_worker`: zap the oldest ceil(n / ratio)
        of the VM's n possible NX huge pages (`nx_lpage_splits`) so that their ranges can
        be mapped huge again; `ratio` is KVM's nx_huge_pages_recovery_ratio, 1..2^32-1
        (0, which disables the worker, is EINVAL: nothing would run). EOPNOTSUPP for a VM
        without `nx_huge_pages`. Returns the tables zapped."""
        self.check_alive()
        if not 1 <= ratio < 1 << 32:
            raise einval(f"ratio {ratio} is not in 1..2^32-1")
        if not self.config.nx_huge_pages:
            raise KvmError(errno.EOPNOTSUPP, f"VM {self.id} has nx_huge_pages off: there "
                           "are no NX huge pages to recover")
        async with self.mmu_lock.write:
            with self._dies_on_bug():
                return await self.mmu.recover_nx_huge_pages(self.memslot_sets, ratio)

    @simulated("harvester")
    async def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG of `slot` (`as_id << 16 | id`): one bit per page, LSB first.
        Without manual protect, the reported pages are cleared and write-protected again."""
        self.check_alive()
        with self._dies_on_bug():
            bitmap = await dirty_log.get_dirty_log(self, slot)
        if self.clock is not None:
            self.clock.charge(self.clock.costs.dirty_bitmap_word * (len(bitmap) // 8))
        return bitmap

    @simulated("harvester")
    async def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                              bitmap: bytes) -> int:
        """KVM_CLEAR_DIRTY_LOG: clear the bits of `bitmap` (bit i: page first_page + i) and
        write-protect those pages again; returns the pages whose bit was set."""
        self.check_alive()
        with self._dies_on_bug():
            return await dirty_log.clear_dirty_log(self, slot, first_page, num_pages, bitmap)

    @simulated_sync("harvester")
    def harvest_dirty_ring(self, vcpu_id: int) -> list[DirtyGfn]:
        """Collect the entries the vCPU's dirty ring published since the last harvest, as
        userspace does; they are recycled by the next `reset_dirty_rings`."""
        self.check_alive()
        vcpu = self.vcpu(vcpu_id)
        with self._dies_on_bug():
            return dirty_log.harvest_dirty_ring(self, vcpu)

    @simulated("harvester")
    async def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry, write-protecting its page
        again; returns the entries recycled."""
        self.check_alive()
        with self._dies_on_bug():
            return await dirty_log.reset_dirty_rings(self)

    # -- introspection ----------------------------------------------------------------

    def walk(self, gpa: int, as_id: int = 0) -> list[SpteInfo]:
        """Every SPTE on the path to gpa in the current root of `as_id`, root first."""
        self.check_alive()
        if not 0 <= as_id < KVM_ADDRESS_SPACE_NUM:
            raise einval(f"address space {as_id} does not exist")
        if not 0 <= gpa <= (self.max_gfn << PAGE_SHIFT) | 0xFFF:
            raise einval(f"gpa {gpa:#x} is beyond the guest physical address width")
        root = next(self.mmu.valid_roots(as_id), None)
        if root is None:
            return []
        return [_spte_info(level, gfn, index, value)
                for level, gfn, index, value in self.mmu.walk(root, gpa >> PAGE_SHIFT)]

    def stats(self) -> dict[str, int]:
        """KVM's VM stats; in virtual time also the clock's now and events and mmu_lock's
        statistics in virtual ns (docs/stats.md)."""
        stats = self.stat.as_dict()
        clock = self.clock
        if clock is not None:
            lock = self.mmu_lock.statistics()
            stats.update(virtual_now_ns=clock.now, virtual_events=clock.dispatches,
                         **{f"mmu_lock_{name}": getattr(lock, name) for name in _LOCK_STATS})
        return stats

    # -- the host mm takes mappings away (host_ops.py) and ages them (aging.py) -------

    @simulated("invalidator")
    async def madvise_dontneed(self, hva: int, size: int) -> None:
        """madvise(MADV_DONTNEED): the pages go; the next touch reads zeroes."""
        self.check_alive()
        with self._dies_on_bug():
            await host_ops.madvise_dontneed(self.host, hva, size)
        self._trace_host_op("madvise_dontneed", hva, hva + size)

    @simulated("vmm")
    async def madvise_populate_write(self, hva: int, size: int) -> int:
        """madvise(MADV_POPULATE_WRITE): fault the range in writable, as a write touch
        does, with its memory allocated; returns the 4K pages populated or swapped in."""
        self.check_alive()
        with self._dies_on_bug():
            populated = await host_ops.madvise_populate_write(self.host, hva, size)
        self._trace_host_op("madvise_populate_write", hva, hva + size, populated)
        return populated

    @simulated("invalidator")
    async def migrate_pages(self, hva: int, size: int) -> int:
        """Move the populated pages of the range to new pfns; returns the 4K pages moved."""
        self.check_alive()
        with self._dies_on_bug():
            moved = await host_ops.migrate(self.host, hva, size)
        self._trace_host_op("migrate", hva, hva + size, moved)
        return moved

    @simulated("invalidator")
    async def swap_out(self, hva: int, size: int) -> int:
        """MADV_PAGEOUT: the pages go to swap; returns how many went."""
        self.check_alive()
        with self._dies_on_bug():
            out = await host_ops.swap_out(self.host, hva, size)
        self._trace_host_op("swap_out", hva, hva + size, out)
        return out

    @simulated("invalidator")
    async def mprotect(self, hva: int, size: int, prot: int) -> None:
        """mprotect(2) of part of a region: `prot` is PROT_NONE, or PROT_READ with or
        without PROT_WRITE (PROT_EXEC is accepted and means nothing to KVM)."""
        self.check_alive()
        with self._dies_on_bug():
            await host_ops.mprotect(self.host, hva, size, prot)
        self._trace_host_op("mprotect", hva, hva + size)

    @simulated("invalidator")
    async def ksm_merge(self, hvas: list[int]) -> int:
        """Merge the pages at `hvas` with identical contents into shared KSM pages;
        returns the pages merged away."""
        self.check_alive()
        with self._dies_on_bug():
            merged = await host_ops.ksm_merge(self.host, hvas)
        self._trace_host_op("ksm_merge", min(hvas), max(hvas) + 1, merged)
        return merged

    @simulated("invalidator")
    async def thp_split(self, hva: int) -> None:
        """split_huge_pmd of the THP mapping hva."""
        self.check_alive()
        with self._dies_on_bug():
            await host_ops.thp_split(self.host, hva)
        self._trace_host_op("thp_split", hva, hva + 1)

    @simulated("invalidator")
    async def thp_collapse(self, hva: int) -> None:
        """khugepaged: the 2M frame at hva becomes one THP."""
        self.check_alive()
        with self._dies_on_bug():
            await host_ops.thp_collapse(self.host, hva)
        self._trace_host_op("thp_collapse", hva, hva + 1)

    # -- the legacy MMU's limit on shadow pages, and the shrinker -----------------------

    @simulated("vmm")
    async def set_nr_mmu_pages(self, nr_mmu_pages: int) -> None:
        """`KVM_SET_NR_MMU_PAGES`: at most this many shadow pages (legacy MMU; the oldest
        above it are zapped now, and faults zap the oldest to make room). The TDP MMU's
        tables are not limited, as in KVM."""
        self.check_alive()
        if nr_mmu_pages < KVM_MIN_ALLOC_MMU_PAGES:
            raise einval(f"nr_mmu_pages {nr_mmu_pages} is below {KVM_MIN_ALLOC_MMU_PAGES}")
        if self.shadow is None:
            return
        async with self.mmu_lock.write:
            with self._dies_on_bug():
                await self.shadow.change_mmu_pages(nr_mmu_pages)

    @simulated("shrinker")
    async def mmu_shrink_scan(self, nr_to_scan: int) -> int:
        """The MMU shrinker under host memory pressure (`mmu_shrink_scan`): zap up to
        `nr_to_scan` of the oldest shadow pages; returns how many were freed. The TDP
        MMU's tables are not on its list (0)."""
        self.check_alive()
        if nr_to_scan < 0:
            raise einval(f"nr_to_scan {nr_to_scan} is negative")
        if self.shadow is None:
            return 0
        async with self.mmu_lock.write:
            with self._dies_on_bug():
                return await self.shadow.zap_oldest_mmu_pages(nr_to_scan)

    @simulated("ager")
    async def clear_young(self, start: int, end: int, fast_only: bool = False) -> bool:
        """The clear_young notifier over hva [start, end): young? Old afterwards.
        `fast_only` (MGLRU): only what can be learnt without mmu_lock."""
        self.check_alive()
        with self._dies_on_bug():
            return await aging.clear_young(self, start, end, fast_only)

    @simulated("ager")
    async def clear_flush_young(self, start: int, end: int) -> bool:
        """The clear_flush_young notifier: on x86 the same as `clear_young`."""
        self.check_alive()
        with self._dies_on_bug():
            return await aging.clear_flush_young(self, start, end)

    @simulated_sync("ager")
    def test_young(self, hva: int) -> bool:
        """The test_young notifier for the page at hva; ages nothing."""
        self.check_alive()
        return aging.test_young(self, hva)

    @simulated_sync("ager")
    def young_bitmap(self, start: int, end: int) -> bytes:
        """test_young for each 4K page [start, end) touches, one bit per page, LSB first."""
        self.check_alive()
        return aging.young_bitmap(self, start, end)

    @contextlib.contextmanager
    def _dies_on_bug(self) -> Iterator[None]:
        """A broken invariant met on the way (KVM_BUG_ON) kills the VM, then rises."""
        try:
            yield
        except VmBugged as bug:
            self.mark_dead(bug)
            raise

    def _trace_host_op(self, op: str, start: int, end: int, pages: int = 0) -> None:
        if self.tracer.on:
            self.tracer.emit("host_mm_op", op=op, start=start, end=end, pages=pages)


def _spte_info(level: int, gfn: int, index: int, value: int) -> SpteInfo:
    kind = S.describe(value, level)
    present = kind in ("leaf", "table")
    return SpteInfo(level, gfn, index, value, kind,
                    S.spte_to_pfn(value) if present else 0,
                    present and bool(value & S.READABLE), present and S.is_writable(value),
                    present and bool(value & S.EXECUTABLE), present and S.is_large(value),
                    present and S.is_accessed(value), present and S.is_dirty(value),
                    S.is_host_writable(value), S.is_mmu_writable(value),
                    kind == "leaf" and is_zero_pfn(S.spte_to_pfn(value)))
