"""The page-fault path: `kvm_mmu_page_fault` down to `kvm_tdp_mmu_map`.

    page_fault
      RSVD (EPT misconfig)  -> handle_mmio_page_fault: an MMIO SPTE of this generation
                               emulates at once; a stale one takes the full path
      pf_taken++
      fast page fault       write-protected or access-tracked leaf: fixed without the lock
      tdp_page_fault        the rest, if the fast path did not fix it:
        faultin             snapshot mmu_invalidate_seq; memslot; host pfn (GUP-fast, else
                            the lookup that may sleep); the unlocked retry pre-checks
        mmu_lock for read   is_page_fault_stale (root invalid, retry_gfn)
          hugepage_adjust   the level the slot, the lpage rules and the host allow; 4K
                            for a fetch under the NX huge page mitigation
          TdpMmu.map        walk, link, install with CAS
      each outcome is counted: pf_fixed, pf_emulate, pf_spurious, pf_retry

A KvmError(EFAULT) out of the pfn lookup is KVM_RUN's -EFAULT (a memory-fault exit).

The fast page fault (`fast_page_fault`, reference §2.7) fixes an SPTE without mmu_lock, only
inside an RCU read-side section, and only by a compare-and-exchange against the snapshot
the walk read. It fixes exactly three things:
- a write to a present 4K leaf that is write-protected for dirty logging (W clear,
  MMU-writable set): W is set and, W having gone 0 -> 1, the page is marked dirty;
- an access to an access-tracked SPTE (A/D bits off): R/X (and A) are restored;
- a spurious fault (the SPTE already allows the access: a stale TLB, or another vCPU fixed
  it first): nothing to do.
It never allocates, never changes a pfn, never touches a non-leaf SPTE, and refuses a huge
leaf in a dirty-logged slot (the slow path must split it). Anything else goes to the slow
path (RET_PF_INVALID). Between the read and the cmpxchg another task may change the SPTE
(preemption point `fast_pf.cas`): the cmpxchg then fails and the walk is done again. It
asks for the fault only its address and error code: the fault object is made only for the
slow path, which fills it in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import spte as S
from .guest_memfd import faultin_private
from .mmu_internal import (ACCESS_NEEDS, PFERR_ACCESS_MASK, PFERR_FETCH_MASK,
                           PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK,
                           PFERR_WRITE_MASK, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID,
                           RET_PF_RETRY, RET_PF_SPURIOUS, PageFault, RetPf)
from .mmu_page import UseAfterFree
from .spte import LOW_BITS, MMU_PRESENT, MMU_WRITABLE, RWX, WRITABLE
from .tdp_iter import last_spte
from .types import MAX_HUGEPAGE_LEVEL, PAGE_SHIFT, PG_LEVEL_4K, pages_per_level

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm

__all__ = ["page_fault", "hugepage_adjust", "page_fault_can_be_fast", "can_be_fast_table",
           "FAULT_BITS", "FAST_PF_TRIES"]

# The error code's bits the fault path branches on, as a small int: a full error code
# (GUEST_FINAL is bit 32) makes each test of it a big-int operation.
FAULT_BITS = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_RSVD_MASK | \
    PFERR_FETCH_MASK
# Walks of one fast page fault at most: the first, and one more after each lost cmpxchg
# while KVM's `++retry_count > 4` is false; then the slow path takes the fault.
FAST_PF_TRIES = 5
_FAST_PF_TRIES = range(FAST_PF_TRIES)
_PRESENT_WRITE = PFERR_PRESENT_MASK | PFERR_WRITE_MASK
_PRESENT_WRITE_RSVD = _PRESENT_WRITE | PFERR_RSVD_MASK
# By the fault's bits: the SPTE bit the access needs, and the write bit, in one lookup.
_FAST_PF_ACCESS = tuple((ACCESS_NEEDS[bits & PFERR_ACCESS_MASK], bits & PFERR_WRITE_MASK)
                        for bits in range(FAULT_BITS + 1))


def page_fault_can_be_fast(vm: "Vm", error_code: int) -> bool:
    """A write to a present SPTE, or, A/D bits off, an access to a not-present one (it may
    be access-tracked); never an MMIO fault (RSVD)."""
    if error_code & _PRESENT_WRITE_RSVD == _PRESENT_WRITE:
        return vm.config.fast_page_fault
    if error_code & (PFERR_PRESENT_MASK | PFERR_RSVD_MASK):
        return False
    return not vm.ad_enabled and vm.config.fast_page_fault


def can_be_fast_table(vm: "Vm") -> tuple[bool, ...]:
    """`page_fault_can_be_fast` for `vm`, by `error_code & FAULT_BITS`: the fault path asks
    on every fault, and the answer depends on settings fixed at VM creation."""
    return tuple(page_fault_can_be_fast(vm, bits) for bits in range(FAULT_BITS + 1))


async def page_fault(vcpu: "Vcpu", gpa: int, error_code: int) -> RetPf:
    """`kvm_mmu_page_fault`, with `kvm_mmu_do_page_fault` and the fast path of
    `kvm_tdp_page_fault` (`fast_page_fault`) spelled out, so that a fault the fast path
    fixes runs in this one coroutine: a coroutine of its own cost such a fault (its exit
    and re-entry included) 4 % more."""
    vm = vcpu.vm
    if vm.tracer.on:
        vm.tracer.emit("kvm_page_fault", vcpu=vcpu.id, gpa=gpa, error_code=error_code)
    bits = error_code & FAULT_BITS
    clock = vm.clock
    if clock is not None:
        clock.charge(clock.costs.fault_base)
    if bits & PFERR_RSVD_MASK:
        r = handle_mmio_page_fault(vcpu, gpa)
        if r is not RET_PF_INVALID:
            return r
    stats = vcpu.stat
    stats.pf_taken += 1
    r = RET_PF_INVALID
    # A software-protected VM's access is private when its gfn is (KVM sets
    # PFERR_PRIVATE_ACCESS from the attributes, for any fault but an MMIO one); a private
    # fault is never fast.
    attrs = vm.mem_attributes
    private = bool(attrs.starts) and not bits & PFERR_RSVD_MASK and \
        attrs.is_private(gpa >> PAGE_SHIFT)
    if vm.can_be_fast[bits] and not private:                # page_fault_can_be_fast
        # fast_page_fault: FIXED or SPURIOUS when the leaf needs no mmu_lock, else INVALID.
        gfn = gpa >> PAGE_SHIFT
        need, write = _FAST_PF_ACCESS[bits]
        rcu = vm.rcu
        token = rcu.enter()
        # fault->slot: looked up once, inside the read-side section. Of the memslot
        # updates only turning dirty logging on or off waits the section out
        # (`dirty_log.commit_memslot`): it protects the slot after this cmpxchg and its
        # mark. A delete or move zaps the slot's SPTEs instead (`Vm._zap_all_fast`): the
        # cmpxchg then fails, or what it stored is zapped after it.
        slot = vcpu.memslots.lookup(gfn)
        if clock is not None:
            clock.charge(clock.costs.memslot_lookup + clock.costs.fast_pf)
        try:
            for _ in _FAST_PF_TRIES:
                table, index, level, old = last_spte(vcpu.root, gfn)
                flags = old & LOW_BITS
                if not flags & MMU_PRESENT:
                    break                         # nothing to fix: the slow path maps it
                if flags & need:
                    r = RET_PF_SPURIOUS
                    break
                new = old
                if not flags & RWX and S.ad_disabled(old):
                    new = S.restore_access_track(new)
                make_writable = write and old & MMU_WRITABLE
                if make_writable:
                    if level > PG_LEVEL_4K and slot is not None and slot.dirty_logging:
                        break                     # only the slow path may split it
                    new |= WRITABLE               # W was clear: the access needs it
                elif new == old or not new & need:
                    break
                await vm.sched.point("fast_pf.cas")
                if table.freed:
                    raise UseAfterFree(f"fast page fault wrote freed {table!r}")
                spt = table.spt
                if spt[index] != old and "fast_pf_plain_write" not in vm.knobs:
                    continue                      # changed under us: walk again
                spt[index] = new                  # the cmpxchg (the debug knob: no compare)
                if clock is not None:
                    clock.charge(clock.costs.spte_cmpxchg)
                if make_writable and slot is not None:
                    vm.mark_page_dirty(slot, gfn, vcpu)     # W went 0 -> 1
                r = RET_PF_FIXED
                break
        finally:
            rcu.exit(token)
        if r is not RET_PF_INVALID:
            stats.pf_fast += 1
        if vm.tracer.on:
            vm.tracer.emit("fast_page_fault", vcpu=vcpu.id, gpa=gpa, error_code=error_code,
                           result=r.name)
    if r is RET_PF_INVALID:
        fault = PageFault(gpa, error_code)
        if private:
            fault.is_private = True
        r = await tdp_page_fault(vcpu, fault)
    if r is RET_PF_FIXED:
        stats.pf_fixed += 1
    elif r is RET_PF_EMULATE:
        stats.pf_emulate += 1
    elif r is RET_PF_SPURIOUS:
        stats.pf_spurious += 1
    else:
        stats.pf_retry += 1
    return r


def handle_mmio_page_fault(vcpu: "Vcpu", gpa: int) -> RetPf:
    """An MMIO SPTE was hit: emulate if its generation is current, else refault."""
    vm = vcpu.vm
    path = vm.mmu.walk(vcpu.root, gpa >> 12)
    leaf = path[-1][3]
    if not S.is_mmio(leaf):
        return RET_PF_RETRY          # zapped meanwhile
    if S.mmio_generation(leaf) != vm.memslot_sets[0].generation & S.MMIO_GEN_MASK:
        return RET_PF_INVALID
    vcpu.stat.mmio_spte_hits += 1
    if vm.tracer.on:
        vm.tracer.emit("handle_mmio_page_fault", gpa=gpa, gfn=gpa >> 12)
    return RET_PF_EMULATE


async def tdp_page_fault(vcpu: "Vcpu", fault: PageFault) -> RetPf:
    """`kvm_tdp_mmu_page_fault` past the fast path: faultin, mmu_lock for read, map.

    `kvm_mmu_faultin_pfn` is the first part, spelled out here rather than a coroutine of
    its own: a coroutine costs every fault about 0.1 µs, and it runs on every slow fault."""
    vm = vcpu.vm
    # The memslot the fault looks up must not change under it until its SPTE is in and the
    # page marked dirty: the read-side section stands in for KVM's SRCU (kvm->srcu).
    rcu = vm.rcu
    token = rcu.enter()
    try:
        # faultin: snapshot the invalidation sequence, find the slot and the host pfn
        # (GUP-fast first; the slow lookup may sleep), pre-check for a retry.
        notifier, sched = vm.notifier, vm.sched
        mmu_seq = fault.mmu_seq = notifier.mmu_invalidate_seq
        await sched.point("fault.after_seq_snapshot")
        slots = vcpu.memslots
        fault.generation = slots.generation
        gfn = fault.gfn
        slot = slots.lookup(gfn)
        clock = vm.clock
        if clock is not None:
            clock.charge(clock.costs.memslot_lookup)
        if fault.is_private or vm.mem_attributes.starts:
            r = faultin_private(vm, fault, slot)          # raises a memory-fault exit
            if r is not None:
                return r
        if slot is not None and not fault.is_private:
            if slot.invalid:
                return RET_PF_RETRY
            write = fault.write
            if write and slot.readonly:
                return RET_PF_EMULATE                      # KVM_PFN_ERR_RO_FAULT
            fault.slot = slot
            check_retry = "skip_invalidate_retry" not in vm.knobs
            if check_retry and notifier.retry_gfn_unsafe(mmu_seq, gfn):
                return RET_PF_RETRY
            hva = fault.hva = slot.gfn_to_hva(gfn)
            await sched.point("fault.hva_to_pfn")
            host = vm.host
            found = host.hva_to_pfn_nowait(hva, write)     # charges GUP-fast and slow
            if found is None:                              # a write must break COW first
                found = await host.hva_to_pfn_slow(hva, write)
            fault.pfn, writable, fault.host_level = found
            fault.map_writable = writable and not slot.readonly
            if check_retry and notifier.retry_gfn_unsafe(mmu_seq, gfn):
                return RET_PF_RETRY
        elif gfn > vm.max_gfn:
            return RET_PF_EMULATE                          # kvm_handle_noslot_fault
        await sched.point("fault.before_lock")
        lock = vm.mmu_lock
        # The TDP MMU maps with mmu_lock held for read (unless the VM's fault_lock policy
        # says write), the legacy MMU for write.
        shadow = vm.shadow
        shared = shadow is None and vm.config.fault_lock == "read"
        await (lock.acquire_read() if shared else lock.acquire_write())
        try:
            if is_page_fault_stale(vcpu, fault):
                return RET_PF_RETRY
            hugepage_adjust(vcpu, fault)
            if vm.tracer.on:
                vm.tracer.emit("kvm_mmu_spte_requested", gfn=gfn, pfn=fault.pfn,
                               level=fault.goal_level)
            if shadow is None:
                r = vm.tdp.map(fault, vcpu.root)
            else:
                await shadow.make_mmu_pages_available()
                r = await shadow.map(fault, vcpu.root)
            if r is RET_PF_FIXED:
                if fault.map_writable and slot.dirty_logging:
                    vm.mark_page_dirty(slot, gfn, vcpu)   # a writable SPTE is in
            elif r is RET_PF_EMULATE:
                vcpu.stat.pf_mmio_spte_created += 1
            return r
        finally:
            if shared:
                lock.release_read()
            else:
                lock.release_write()
    finally:
        rcu.exit(token)
        if vm.tdp is not None and vm.tdp.disconnected:
            await vm.tdp.free_disconnected()    # table_free "write_section"


def is_page_fault_stale(vcpu: "Vcpu", fault: PageFault) -> bool:
    """Under mmu_lock: the root went invalid, or an invalidation ran since the snapshot."""
    if vcpu.root.invalid:
        return True
    vm = vcpu.vm
    return fault.slot is not None and vm.notifier.retry_gfn(fault.mmu_seq, fault.gfn) and \
        "skip_invalidate_retry" not in vm.knobs


def hugepage_adjust(vcpu: "Vcpu", fault: PageFault) -> None:
    """Pick `goal_level`: memslot lpage rules, dirty logging and the host mapping level.
    Under the NX huge page mitigation an instruction fetch is `huge_page_disallowed`: it
    keeps `req_level`, the level it could have mapped, but maps at 4K."""
    if fault.error_code & PFERR_FETCH_MASK and vcpu.vm.config.nx_huge_pages:
        fault.huge_page_disallowed = True
    slot = fault.slot
    if slot is None or fault.host_level == PG_LEVEL_4K or fault.max_level == PG_LEVEL_4K or \
            slot.dirty_logging:
        return
    # The level the host maps hva at was read with the pfn; a change since would have moved
    # mmu_invalidate_seq, and the fault has just checked it under mmu_lock.
    level = slot.max_lpage_level(fault.gfn, min(fault.max_level, MAX_HUGEPAGE_LEVEL,
                                                fault.host_level))
    attrs = vcpu.vm.mem_attributes
    if attrs.starts:                # a frame of mixed private and shared gfns maps by 4K
        level = attrs.max_mapping_level(fault.gfn, level)
    fault.req_level = level
    if level > PG_LEVEL_4K and not fault.huge_page_disallowed:
        fault.goal_level = level
        fault.pfn &= ~(pages_per_level(level) - 1)
