"""Schedule exploration: run a scenario under many seeds and report the first violation.

A scenario builds a VM with a schedule seed, the sanitizers on and some protections
switched off (debug knobs), starts the tasks whose race the seeds argue about, and reports
what the sanitizers saw. With every protection on, no seed may find a violation; with the
knob a scenario is about, exploration must find one within a bounded number of seeds.

| scenario | race | protection that prevents it (knob) |
| --- | --- | --- |
| `fault_vs_invalidate` | a fault resolves a pfn, the host migrates the page, the fault installs the old pfn | the mmu_invalidate_seq / in-progress retry (`skip_invalidate_retry`) |
| `tlb_vs_zap` | a vCPU keeps using a TLB entry for a page the host has migrated | the TLB flush after a zap (`skip_zap_tlb_flush`) |
| `aging_vs_table_free` | lockless aging reads a table that a memslot deletion unlinked and freed | RCU: free after a grace period (`free_tables_immediately`), aging inside a read-side section (`aging_without_rcu`) |
| `gpc_refresh_vs_invalidate` | a GPC refresh looks up a pfn, the host migrates or drops the page, the refresh sets valid with the old pfn | refresh's wait and retry (`gpc_refresh_no_check`), `global` policy |
| `gpc_range_refresh_vs_invalidate` | the same, with other pages' invalidations held open meanwhile | the same, `range` policy |
| `fast_pf_vs_invalidate` | the fast page fault reads a write-protected SPTE, the host migrates the page and the zap clears it, the fast path stores the old SPTE with W set: the old pfn mapped | the cmpxchg against the snapshot (`fast_pf_plain_write`) |
| `dirty_log_vs_tlb` | GET_DIRTY_LOG write-protects a page a vCPU still writes through a stale writable TLB entry: a write lost to the log | the TLB flush after write-protecting (`skip_wrprot_flush`) |
| `rmap_walk_vs_rmap_change` | lockless (fast_only) rmap aging walks a descriptor chain that a zap of obsolete pages, new faults and a host zap of the head reshape and free | the read-only rmap lock (`rmap_walk_without_lock`) |
| `lockless_age_vs_drop_spte` | lockless aging (A/D off, fast_only) stores an access-tracked SPTE over one a write fault dropped | report young and leave it (`lockless_age_access_track`) |
| `fast_pf_vs_shadow_page_free` | a fast page fault holds a shadow page that zap_all_fast unlinks | free after the flush, on commit (`free_sp_before_flush`) |
| `attributes_vs_fault` | a fault decides shared (or private) and resolves its pfn, KVM_SET_MEMORY_ATTRIBUTES flips the gfn, the fault installs the pfn of the old kind | the invalidation held over the change: in-progress, then the sequence (`skip_invalidate_retry`) |
| `gmem_hole_vs_fault` | a private fault takes a guest_memfd page, a hole punched in the file frees it, the fault installs the freed page | the hole's invalidation and the fault's retry (`skip_invalidate_retry`) |
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

from .batch import AccessBatch
from .errors import KvmError, VmBugged, einval
from .kvm import Kvm
from .guest_memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from .mem_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from .memslots import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES
from .sanitizers import SanitizerViolation
from .types import PAGE_SIZE, AccessKind, Backing
from .vm import Vm, VmConfig, check_debug_knobs

__all__ = ["SCENARIOS", "Outcome", "ExploreResult", "ExploreStep", "check", "run_scenario",
           "explore", "explore_steps"]

ROUNDS = 6
PAGES = 16
MAX_SEEDS = 1_000_000


@dataclass(frozen=True)
class Outcome:
    """What one seed did: `violation` is None when every oracle held."""

    seed: int
    violation: str | None = None
    oracle: str = ""
    gfn: int = -1
    trace: str = ""
    points: int = 0


@dataclass(frozen=True)
class ExploreResult:
    scenario: str
    knobs: frozenset[str]
    seeds_run: int
    first_violation: Outcome | None
    workers_lost: int = 0            # worker processes that died; their seeds ran again


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    knobs: frozenset[str]            # the protections whose absence it demonstrates
    body: Callable[[Vm, random.Random], Awaitable[None]]
    gpc_policy: str = "global"       # the VM's GPC refresh policy (gpc.py)
    mmu: str = "tdp"                 # the VM's MMU (VmConfig.mmu)
    ad_bits: bool = True


async def _guest(vm: Vm, pages: int = PAGES) -> tuple[int, object]:
    region = vm.mmap(pages * PAGE_SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, pages * PAGE_SIZE, region.hva)
    return region.hva, vm.create_vcpu(0)


def _reads(pages: int = PAGES) -> AccessBatch:
    return AccessBatch.build((g * PAGE_SIZE, AccessKind.READ, 8, None) for g in range(pages))


async def _together(**coros) -> None:
    """Run the scenario's named tasks; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for name, coro in coros.items():
                group.create_task(coro, name=name)
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


async def _run_rounds(vcpu, rounds: int = ROUNDS) -> None:
    batch = _reads()
    for _ in range(rounds):
        await vcpu.run(batch)
        await vcpu.vm.sched.point("vcpu.entry")


async def _fault_vs_invalidate(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _guest(vm)

    async def host() -> None:
        for _ in range(ROUNDS * 2):
            page = rng.randrange(PAGES)
            await vm.migrate_pages(hva + page * PAGE_SIZE, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=_run_rounds(vcpu), host=host())


async def _tlb_vs_zap(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _guest(vm)
    await vcpu.run(_reads())                   # every page in the TLB

    async def host() -> None:
        for _ in range(ROUNDS):
            await vm.migrate_pages(hva + rng.randrange(PAGES) * PAGE_SIZE, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=_run_rounds(vcpu, ROUNDS * 2), host=host())


async def _aging_vs_table_free(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _guest(vm)
    await vcpu.run(_reads())

    async def aging() -> None:
        for _ in range(ROUNDS):
            await vm.clear_young(hva, hva + PAGES * PAGE_SIZE)

    async def memslots() -> None:
        for _ in range(ROUNDS // 2):
            await vm.sched.point("mm.invalidate_window")
            await vm.set_user_memory_region(0, 0, 0, 0, 0)                   # delete
            await vm.set_user_memory_region(0, 0, 0, PAGES * PAGE_SIZE, hva)  # and again
            await vcpu.run(_reads())

    await _together(aging=aging(), memslots=memslots())


GPC_PAGE = 3                         # the guest page the scenario's cache maps


async def _gpc_refresh_vs_invalidate(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _guest(vm)
    gpc = await vm.gpcs.create(GPC_PAGE * PAGE_SIZE + 8, 8)

    async def user() -> None:
        for n in range(ROUNDS):
            while not gpc.check(8):
                await gpc.refresh(8)
            gpc.write(0, n.to_bytes(8, "little"))
            await vm.sched.point("vcpu.entry")
            if gpc.check(8):
                gpc.read(0, 8)

    async def host() -> None:
        for _ in range(ROUNDS):
            page = GPC_PAGE if rng.random() < 0.6 else rng.randrange(PAGES)
            take_away = vm.migrate_pages if rng.random() < 0.5 else vm.madvise_dontneed
            await take_away(hva + page * PAGE_SIZE, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    async def holder() -> None:      # invalidations held open a while, mostly of others
        for _ in range(ROUNDS // 2):
            page = GPC_PAGE if rng.random() < 0.3 else rng.randrange(PAGES)
            start = hva + page * PAGE_SIZE
            async with vm.hold_invalidation(start, start + PAGE_SIZE):
                await vm.sched.point("mm.invalidate_window")

    async def guest() -> None:       # faults hold mmu_lock for read: an invalidation may
        for _ in range(ROUNDS // 2):  # wait for it after its GPC sweep, its change to come
            await vcpu.run(_reads(GPC_PAGE + 1))
            await vm.sched.point("vcpu.entry")

    await _together(gpc=user(), host=host(), holder=holder(), vcpu0=guest())


async def _logged_guest(vm: Vm) -> tuple[int, object]:
    """A 4K guest whose slot logs dirty pages, every page written (and so dirty) once."""
    hva, vcpu = await _guest(vm)
    await vcpu.run(_writes())
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGES * PAGE_SIZE, hva)
    return hva, vcpu


def _writes(pages: int = PAGES) -> AccessBatch:
    return AccessBatch.build((g * PAGE_SIZE, AccessKind.WRITE, 8, None) for g in range(pages))


async def _fast_pf_vs_invalidate(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _logged_guest(vm)

    async def guest() -> None:
        for _ in range(ROUNDS):
            await vm.get_dirty_log(0)          # write-protect again: the next writes fault
            await vcpu.run(_writes())
            await vm.sched.point("vcpu.entry")

    async def host() -> None:
        for _ in range(ROUNDS * 2):
            await vm.migrate_pages(hva + rng.randrange(PAGES) * PAGE_SIZE, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=guest(), host=host())


async def _dirty_log_vs_tlb(vm: Vm, rng: random.Random) -> None:
    _, vcpu = await _logged_guest(vm)

    async def guest() -> None:
        for _ in range(ROUNDS * 2):
            await vcpu.run(_writes())
            await vm.sched.point("vcpu.entry")

    async def harvester() -> None:
        for _ in range(ROUNDS):
            await vm.get_dirty_log(0)
            await vm.sched.point("vcpu.entry")
        await vm.get_dirty_log(0)

    await _together(vcpu0=guest(), harvester=harvester())


# -- the legacy MMU's races (shadow_mmu.py, rmap.py, rmap_aging.py) ------------------------

SPREAD = 2 << 20                     # one guest page per 2M: a shadow page (4K level) each


async def _spread_guest(vm: Vm, backing: Backing = Backing.PAGE_4K, flags: int = 0,
                        pages: int = PAGES) -> tuple[int, object]:
    """Slot 0: `pages` pages one 2M apart (so many shadow pages), and slot 1: a small slot
    whose deletion and re-creation runs zap_all_fast."""
    region = vm.mmap(pages * SPREAD, backing)
    await vm.set_user_memory_region(0, flags, 0, pages * SPREAD, region.hva)
    other = vm.mmap(PAGES * PAGE_SIZE, Backing.PAGE_4K)
    await vm.set_user_memory_region(1, 0, pages * SPREAD, PAGES * PAGE_SIZE, other.hva)
    return region.hva, vm.create_vcpu(0)


def _spread(kind: AccessKind, data: bytes | None = None,
            order: "range | list[int]" = range(PAGES)) -> AccessBatch:
    return AccessBatch.build((g * SPREAD, kind, 8, data) for g in order)


async def _flap_slot1(vm: Vm) -> None:
    """Delete slot 1 and make it again: zap_all_fast, yielding mmu_lock between batches."""
    other = vm.memslots()[-1]
    await vm.set_user_memory_region(1, 0, 0, 0, 0)
    await vm.set_user_memory_region(1, 0, other.guest_phys_addr, other.memory_size,
                                    other.userspace_addr)


RMAP_PAGES = 48                      # shadow pages enough for zap_all_fast to yield often


async def _rmap_walk_vs_rmap_change(vm: Vm, rng: random.Random) -> None:
    pages = RMAP_PAGES
    hva, vcpu = await _spread_guest(vm, pages=pages)
    await vcpu.run(_spread(AccessKind.READ, order=range(pages)))

    async def guest() -> None:       # faults into the fresh root while obsolete SPTEs of
        for _ in range(ROUNDS * 2):  # the same gfns wait in their rmaps: chains form
            await vcpu.run(_spread(AccessKind.READ, order=rng.sample(range(pages), pages)))
            await vm.sched.point("vcpu.entry")

    async def memslots() -> None:
        for _ in range(ROUNDS):
            await _flap_slot1(vm)
            await vm.sched.point("vcpu.entry")

    async def host() -> None:        # kvm_zap_all_rmap_sptes: a head's descriptors freed
        for _ in range(ROUNDS * 2):  # at once, its shadow pages kept
            await vm.migrate_pages(hva + rng.randrange(pages) * SPREAD, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    async def aging() -> None:       # MGLRU's fast_only aging, A/D off: it only reads
        for _ in range(ROUNDS * 4):
            await vm.clear_young(hva, hva + pages * SPREAD, fast_only=True)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=guest(), memslots=memslots(), host=host(), aging=aging())


async def _lockless_age_vs_drop_spte(vm: Vm, rng: random.Random) -> None:
    pages = 8
    region = vm.mmap(pages * SPREAD, Backing.THP)
    # Populated, so that the reads map the THPs themselves (writable), not the huge zero page.
    await vm.madvise_populate_write(region.hva, pages * SPREAD)
    await vm.set_user_memory_region(0, 0, 0, pages * SPREAD, region.hva)
    vcpu = vm.create_vcpu(0)
    huge = AccessBatch.build((g * SPREAD, AccessKind.READ, 8, None) for g in range(pages))

    async def guest() -> None:       # huge leaves, write-protected by logging; each write
        for _ in range(ROUNDS // 2):  # drops one and maps 4K
            await vm.set_user_memory_region(0, 0, 0, pages * SPREAD, region.hva)
            await vcpu.run(huge)
            await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, pages * SPREAD,
                                            region.hva)
            for g in rng.sample(range(pages), pages):
                await vcpu.run(AccessBatch.build([(g * SPREAD + PAGE_SIZE, AccessKind.WRITE,
                                                   8, None)]))
                await vm.sched.point("vcpu.entry")

    async def aging() -> None:       # MGLRU's fast_only aging: without mmu_lock
        for _ in range(ROUNDS * 4):
            await vm.clear_young(region.hva, region.hva + pages * SPREAD, fast_only=True)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=guest(), aging=aging())


async def _fast_pf_vs_shadow_page_free(vm: Vm, rng: random.Random) -> None:
    hva, vcpu = await _spread_guest(vm)
    writes = _spread(AccessKind.WRITE)
    await vcpu.run(writes)
    await vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGES * SPREAD, hva)

    async def guest() -> None:       # every write a fast page fault on a protected SPTE
        for _ in range(ROUNDS * 2):
            await vm.get_dirty_log(0)
            await vcpu.run(writes)
            await vm.sched.point("vcpu.entry")

    async def memslots() -> None:
        for _ in range(ROUNDS):
            await vm.sched.point("vcpu.entry")
            await _flap_slot1(vm)

    await _together(vcpu0=guest(), memslots=memslots())


async def _gmem_guest(vm: Vm) -> tuple[int, object]:
    """PAGES of memory at gpa 0, shared from a host region and private from a guest_memfd."""
    size = PAGES * PAGE_SIZE
    region = vm.mmap(size, Backing.PAGE_4K)
    fd = vm.create_guest_memfd(size).fd
    await vm.set_user_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, size, region.hva, fd, 0)
    return fd, vm.create_vcpu(0)


async def _attributes_vs_fault(vm: Vm, rng: random.Random) -> None:
    _, vcpu = await _gmem_guest(vm)

    async def vmm() -> None:           # converts pages between private and shared
        for _ in range(ROUNDS * 2):
            page = rng.randrange(PAGES)
            attributes = rng.choice((0, KVM_MEMORY_ATTRIBUTE_PRIVATE))
            await vm.set_memory_attributes(page * PAGE_SIZE, PAGE_SIZE, attributes)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=_run_rounds(vcpu), vmm=vmm())


async def _gmem_hole_vs_fault(vm: Vm, rng: random.Random) -> None:
    fd, vcpu = await _gmem_guest(vm)
    await vm.set_memory_attributes(0, PAGES * PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)

    async def vmm() -> None:           # discards private pages, as a VMM does on conversion
        for _ in range(ROUNDS * 2):
            page = rng.randrange(PAGES)
            await vm.guest_memfd_fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                           page * PAGE_SIZE, PAGE_SIZE)
            await vm.sched.point("mm.invalidate_window")

    await _together(vcpu0=_run_rounds(vcpu), vmm=vmm())


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("fault_vs_invalidate", "a vCPU faults while the host migrates its pages",
             frozenset({"skip_invalidate_retry"}), _fault_vs_invalidate),
    Scenario("tlb_vs_zap", "a vCPU hits its TLB while the host migrates its pages",
             frozenset({"skip_zap_tlb_flush"}), _tlb_vs_zap),
    Scenario("aging_vs_table_free", "lockless aging while memslot deletion frees tables",
             frozenset({"free_tables_immediately", "aging_without_rcu"}),
             _aging_vs_table_free),
    Scenario("gpc_refresh_vs_invalidate",
             "a GPC refresh and its user while the host migrates and drops the page",
             frozenset({"gpc_refresh_no_check"}), _gpc_refresh_vs_invalidate),
    Scenario("gpc_range_refresh_vs_invalidate",
             "the same with the range-based refresh policy",
             frozenset({"gpc_refresh_no_check"}), _gpc_refresh_vs_invalidate, "range"),
    Scenario("fast_pf_vs_invalidate",
             "fast page faults fix write-protected SPTEs while the host migrates the pages",
             frozenset({"fast_pf_plain_write"}), _fast_pf_vs_invalidate),
    Scenario("dirty_log_vs_tlb",
             "a vCPU keeps writing while GET_DIRTY_LOG harvests and write-protects",
             frozenset({"skip_wrprot_flush"}), _dirty_log_vs_tlb),
    Scenario("attributes_vs_fault",
             "a vCPU faults while KVM_SET_MEMORY_ATTRIBUTES flips pages private and shared",
             frozenset({"skip_invalidate_retry"}), _attributes_vs_fault),
    Scenario("gmem_hole_vs_fault",
             "a vCPU faults private pages while holes are punched in their guest_memfd",
             frozenset({"skip_invalidate_retry"}), _gmem_hole_vs_fault),
    # The legacy MMU: its own races, and the shared ones on its structures.
    Scenario("rmap_walk_vs_rmap_change",
             "fast_only rmap aging while zap_all_fast, faults and host zaps reshape the "
             "rmaps' descriptor chains",
             frozenset({"rmap_walk_without_lock"}), _rmap_walk_vs_rmap_change, mmu="legacy",
             ad_bits=False),
    Scenario("lockless_age_vs_drop_spte",
             "fast_only aging with A/D bits off while write faults drop huge leaves",
             frozenset({"lockless_age_access_track"}), _lockless_age_vs_drop_spte,
             mmu="legacy", ad_bits=False),
    Scenario("fast_pf_vs_shadow_page_free",
             "fast page faults while zap_all_fast unlinks and frees shadow pages",
             frozenset({"free_sp_before_flush"}), _fast_pf_vs_shadow_page_free, mmu="legacy"),
    Scenario("legacy_fault_vs_invalidate", "fault_vs_invalidate on the legacy MMU",
             frozenset({"skip_invalidate_retry"}), _fault_vs_invalidate, mmu="legacy"),
    Scenario("legacy_tlb_vs_zap", "tlb_vs_zap on the legacy MMU (zaps through the rmaps)",
             frozenset({"skip_zap_tlb_flush"}), _tlb_vs_zap, mmu="legacy"),
    Scenario("legacy_dirty_log_vs_tlb", "dirty_log_vs_tlb on the legacy MMU",
             frozenset({"skip_wrprot_flush"}), _dirty_log_vs_tlb, mmu="legacy"),
)}


def _check_knobs(name: str, knobs: frozenset[str]) -> Scenario:
    if name not in SCENARIOS:
        raise einval(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}")
    check_debug_knobs(knobs)
    return SCENARIOS[name]


async def run_scenario(name: str, seed: int, knobs: frozenset[str] = frozenset(),
                       clock: str = "wall") -> Outcome:
    """Run one scenario under one seed; every oracle is on. In virtual time the seed
    breaks the clock's ties instead of choosing turns at each point."""
    scenario = _check_knobs(name, frozenset(knobs))
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(max_vcpus=1, schedule_seed=seed, sanitizers=True,
                                debug=frozenset(knobs), name=f"{name}#{seed}",
                                gpc_policy=scenario.gpc_policy, mmu=scenario.mmu,
                                ad_bits=scenario.ad_bits, clock=clock))
    bug: VmBugged | None = None
    asyncio.current_task().set_name("setup")
    try:
        await scenario.body(vm, random.Random(seed))
    except VmBugged as caught:
        bug = caught
    except KvmError:
        bug = vm.violation       # a dead VM answers EIO to the tasks still running
        if bug is None:
            raise
    finally:
        points = vm.sched.points_passed
        try:
            await kvm.shutdown()
        except VmBugged:
            pass                   # teardown of a VM whose tables were already misused
    bug = bug or vm.violation
    if bug is None:
        return Outcome(seed, points=points)
    if isinstance(bug, SanitizerViolation):
        return Outcome(seed, str(bug), bug.oracle, bug.gfn, bug.trace, points)
    return Outcome(seed, vm.death or str(bug), type(bug).__name__, -1,
                   vm.sched.describe_trace(), points)


@dataclass(frozen=True)
class ExploreStep:
    """Progress of an exploration: `done` on the last step, with the first violation."""

    seeds_run: int
    done: bool
    first_violation: Outcome | None = None
    workers_lost: int = 0


def check(name: str, seeds: int, knobs: frozenset[str]) -> None:
    """Reject a bad exploration request before anything runs."""
    _check_knobs(name, frozenset(knobs))
    if not 1 <= seeds <= MAX_SEEDS:
        raise einval(f"seeds {seeds} is not in 1..{MAX_SEEDS}")


async def explore_steps(name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                        first_seed: int = 0, every: int = 0):
    """Run seeds first_seed.. in order until a violation or `seeds` runs, yielding a
    progress step every `every` seeds and a last step with the first violation."""
    check(name, seeds, knobs)
    for n, seed in enumerate(range(first_seed, first_seed + seeds), start=1):
        outcome = await run_scenario(name, seed, knobs)
        if outcome.violation is not None:
            yield ExploreStep(n, True, outcome)
            return
        if every and n % every == 0 and n != seeds:
            yield ExploreStep(n, False)
    yield ExploreStep(seeds, True)


async def explore(name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                  first_seed: int = 0) -> ExploreResult:
    """Run an exploration to its end: the first violating seed, or that all passed."""
    async for step in explore_steps(name, seeds, knobs, first_seed):
        if step.done:
            return ExploreResult(name, frozenset(knobs), step.seeds_run, step.first_violation)
    raise AssertionError("explore_steps ended without a last step")
