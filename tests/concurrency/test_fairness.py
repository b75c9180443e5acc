"""Long requests let the event loop go: a probe task keeps running while they work.

Each story runs one long operation as a task beside a probe that only counts how often it
gets the loop. Without a yield inside the operation the probe would run once, after it;
the operations yield when their timeslice (`resched.TIMESLICE_NS`, 2 ms) is used up, so a
probe runs many times. The bound asserted is loose: at least a few turns, whatever the
machine's speed.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig
from vmmu.server.kvm.errors import KvmError

MIB = 1 << 20
PAGE = 4096
MIN_TURNS = 4          # far below what a yielding operation gives, above a blocking one's 1


async def probe_turns(operation) -> tuple[object, int]:
    """Run `operation` (a coroutine) beside a probe: (its result, the probe's turns)."""
    turns = 0
    done = False

    async def probe() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)
    turns = 0                              # count only the turns during the operation
    try:
        result = await operation
    finally:
        done = True
        await task
    return result, turns


async def guest(size: int, backing: Backing = Backing.PAGE_4K, **config):
    vm = Kvm().create_vm(VmConfig(name="fair", sanitizers=False, **config))
    region = vm.mmap(size, backing)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    return vm, region, vm.create_vcpu(0)


def writes(gpas) -> AccessBatch:
    return AccessBatch.build((gpa, AccessKind.WRITE, 8, b"fairness") for gpa in gpas)


async def test_a_batch_of_faults_yields_between_them():
    vm, _, vcpu = await guest(64 * MIB)
    result, turns = await probe_turns(vcpu.run(writes(range(0, 64 * MIB, PAGE))))
    assert result.completed == 64 * MIB // PAGE
    assert turns >= MIN_TURNS


async def test_a_batch_that_never_faults_still_yields_at_the_timer_tick():
    vm, _, vcpu = await guest(2 * MIB)
    gpas = [gpa for _ in range(64) for gpa in range(0, 2 * MIB, PAGE)]
    await vcpu.run(writes(gpas[:512]))                   # every page mapped: all hits now
    exits = vcpu.stats()["exits"]
    result, turns = await probe_turns(vcpu.run(writes(gpas)))
    assert result.completed == len(gpas)
    assert vcpu.stats()["exits"] == exits                # no fault: only ticks
    assert turns >= MIN_TURNS


async def test_populating_a_large_range_yields():
    vm, region, _ = await guest(64 * MIB)
    populated, turns = await probe_turns(vm.madvise_populate_write(region.hva, 64 * MIB))
    assert populated == 64 * MIB // PAGE
    assert turns >= MIN_TURNS


async def test_a_populate_that_yields_often_looks_at_each_page_a_bounded_number_of_times(
        monkeypatch):
    """After a yield a populate goes on where it stopped: it does not look over the whole
    rest of the range for pages that must break copy-on-write again (which made 256 MiB
    take 23 s, 128 MiB 1.1 s). It looks the range over once before it populates, and
    once more where it stopped after each yield: within three times the range's pages
    however many times it yields."""
    from vmmu.server.kvm import resched
    monkeypatch.setattr(resched, "TIMESLICE_NS", 50_000)        # a yield every 50 us
    vm, region, _ = await guest(64 * MIB)
    host, pages = vm.host, 64 * MIB // PAGE
    asked, is_cow, cow_hvas = [0], host.is_cow, host.cow_hvas

    def counted_is_cow(region, hva):
        asked[0] += 1
        return is_cow(region, hva)

    def counted_cow_hvas(region, start, end):
        asked[0] += (end - start) // PAGE
        return cow_hvas(region, start, end)

    monkeypatch.setattr(host, "is_cow", counted_is_cow)
    monkeypatch.setattr(host, "cow_hvas", counted_cow_hvas)
    populated, turns = await probe_turns(vm.madvise_populate_write(region.hva, 64 * MIB))
    assert populated == pages
    assert turns >= 64                          # it yielded many times
    assert asked[0] <= 3 * pages


async def test_pages_that_turn_copy_on_write_while_a_populate_yields_break_it_there(
        monkeypatch):
    from vmmu.server.kvm import resched
    monkeypatch.setattr(resched, "TIMESLICE_NS", 50_000)        # a yield every 50 us
    vm, region, _ = await guest(64 * MIB)
    host = vm.host
    twins = [region.hva + 64 * MIB - i * PAGE for i in range(2, 20, 3)]
    for hva in twins:
        await vm.write_hva(hva, b"twins...")
    populating = asyncio.create_task(vm.madvise_populate_write(region.hva, 64 * MIB))
    while vm.host_regions()[0].populated_4k_pages < 64:
        await asyncio.sleep(0)                  # it has populated some and yielded
    assert await vm.ksm_merge(twins) == len(twins) - 1     # ahead of it: copy-on-write
    assert all(host.is_cow(host.find(hva), hva) for hva in twins)
    assert not populating.done()
    assert await populating == 64 * MIB // PAGE - len(twins)
    assert not any(host.is_cow(host.find(hva), hva) for hva in twins)
    assert len({host.current_pfn(hva) for hva in twins}) == len(twins)
    assert [await vm.read_hva(hva, 8) for hva in twins] == [b"twins..."] * len(twins)


@pytest.mark.parametrize("operation", ["migrate_pages", "swap_out", "madvise_dontneed"])
async def test_migrating_swapping_out_or_dropping_a_large_range_yields(operation):
    vm, region, _ = await guest(64 * MIB)
    await vm.madvise_populate_write(region.hva, 64 * MIB)
    done, turns = await probe_turns(getattr(vm, operation)(region.hva, 64 * MIB))
    assert done == (None if operation == "madvise_dontneed" else 64 * MIB // PAGE)
    assert vm.host_regions()[0].populated_4k_pages == \
        (0 if operation != "migrate_pages" else 64 * MIB // PAGE)
    assert turns >= MIN_TURNS


@pytest.mark.parametrize("operation", ["populate", "read", "write"])
async def test_a_region_unmapped_while_a_long_host_operation_yields_fails_it_there(operation):
    vm, region, _ = await guest(64 * MIB)
    start = {"populate": lambda: vm.madvise_populate_write(region.hva, 64 * MIB),
             "read": lambda: vm.read_hva(region.hva, 64 * MIB),
             "write": lambda: vm.write_hva(region.hva, bytes(64 * MIB))}[operation]
    running = asyncio.create_task(start())
    while not (info := vm.host_regions()[0]).populated_4k_pages and not info.zero_pages:
        await asyncio.sleep(0)                  # it has begun (a read maps the zero page)
    await vm.munmap(region.hva, 64 * MIB)
    with pytest.raises(KvmError) as error:
        await running
    assert error.value.errno == (errno.ENOMEM if operation == "populate" else errno.EFAULT)


async def test_reading_and_writing_a_large_range_yield():
    vm, region, _ = await guest(64 * MIB)
    data = bytes(range(256)) * (64 * MIB // 256)
    _, turns = await probe_turns(vm.write_hva(region.hva, data))
    assert turns >= MIN_TURNS
    read, turns = await probe_turns(vm.read_hva(region.hva, 64 * MIB))
    assert read == data
    assert turns >= MIN_TURNS


async def test_a_ksm_merge_of_many_pages_yields():
    vm, region, _ = await guest(16 * MIB)
    await vm.madvise_populate_write(region.hva, 16 * MIB)
    hvas = list(range(region.hva, region.hva + 16 * MIB, PAGE))
    merged, turns = await probe_turns(vm.ksm_merge(hvas))
    assert merged == len(hvas) - 1                       # all zero pages: one group
    assert turns >= MIN_TURNS


async def test_tearing_down_a_sparse_vm_frees_tables_whole_and_yields():
    """One read every 2 MiB: a 4K table of 511 empty entries per access. Teardown frees
    table after table, without a change to any of their SPTEs."""
    size = 16 << 30
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(name="sparse", sanitizers=False))
    region = vm.mmap(size, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    reads = AccessBatch.build((gpa, AccessKind.READ, 8, None) for gpa in range(0, size, 2 * MIB))
    await vm.create_vcpu(0).run(reads)
    tables = vm.stats()["tdp_mmu_pages"]
    assert vm.stats()["pages_4k"] == size // (2 * MIB) and tables > size // (2 * MIB)

    trace = kvm.trace([vm.id], events=["kvm_tdp_mmu_spte_changed", "kvm_mmu_prepare_zap_page"],
                      capacity=1 << 16)
    _, turns = await probe_turns(kvm.destroy_vm(vm.id))
    events = [event.event async for event, _ in trace]
    assert events == ["kvm_mmu_prepare_zap_page"] * (tables - 1)     # every table but the root
    assert vm.stats()["pages_4k"] == vm.stats()["tdp_mmu_pages"] == 0
    assert len(vm.tdp.tables) == 0                                   # freed after the grace
    assert turns >= MIN_TURNS


async def test_a_vm_with_a_schedule_seed_never_yields_for_its_timeslice():
    """Only the seeded points switch tasks, so a seed replays: with no point on its way
    (every access hits), a long batch runs to its end without letting the probe in."""
    vm, _, vcpu = await guest(2 * MIB, schedule_seed=7)
    gpas = [gpa for _ in range(64) for gpa in range(0, 2 * MIB, PAGE)]
    await vcpu.run(writes(gpas[:512]))
    result, turns = await probe_turns(vcpu.run(writes(gpas)))
    assert result.completed == len(gpas)
    assert turns <= 1


async def test_runs_that_gave_the_loop_away_get_it_back_one_a_turn():
    """Two long batches at once: once both have started, a turn of the loop resumes one of
    them, never both, so a turn holds one slice and not one per run."""
    runs = [await guest(64 * MIB) for _ in range(2)]
    batches = [vcpu.run(writes(range(0, 64 * MIB, PAGE))) for _, _, vcpu in runs]
    tasks = [asyncio.create_task(batch) for batch in batches]
    exits = [0, 0]
    started = [False, False]
    turns_with_progress = turns_with_both = 0
    while not all(task.done() for task in tasks):
        await asyncio.sleep(0)                      # one turn of the loop
        now = [vcpu.stats()["exits"] for _, _, vcpu in runs]
        moved = [a != b for a, b in zip(now, exits)]
        if all(started):
            turns_with_progress += any(moved)
            turns_with_both += all(moved)
        started = [s or m for s, m in zip(started, moved)]
        exits = now
    assert [task.result().completed for task in tasks] == [64 * MIB // PAGE] * 2
    assert turns_with_progress >= MIN_TURNS
    assert turns_with_both == 0


async def test_a_run_cancelled_while_it_waits_for_its_turn_is_skipped():
    """Three long batches; one is cancelled while it waits to get the loop back: the
    other two still get their turns and finish."""
    runs = [await guest(64 * MIB) for _ in range(3)]
    tasks = [asyncio.create_task(vcpu.run(writes(range(0, 64 * MIB, PAGE))))
             for _, _, vcpu in runs]
    victim = runs[2][2]
    while not all(vcpu.stats()["exits"] for _, _, vcpu in runs):
        await asyncio.sleep(0)                      # all three have had a slice
    before = victim.stats()["exits"]
    await asyncio.sleep(0)
    while victim.stats()["exits"] != before:        # it ran this turn: wait for one it did not
        before = victim.stats()["exits"]
        await asyncio.sleep(0)
    tasks[2].cancel()
    done, _ = await asyncio.wait(tasks[:2], timeout=60)     # a hang guard, not a timing
    assert [task.result().completed for task in done] == [64 * MIB // PAGE] * 2
    assert tasks[2].cancelled()
