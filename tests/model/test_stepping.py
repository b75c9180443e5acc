"""`VirtualClock.gather`: coroutines the clock steps itself give the results tasks give,
to the byte, and behave as tasks do (locks owned apart, errors, cancellation, waits
outside the simulation)."""

from __future__ import annotations

import asyncio
import json

import pytest

from vmmu.server.kvm import AccessBatch, AccessKind, Backing, Kvm, VmConfig
from vmmu.server.kvm.clock import Actor, VirtualClock
from vmmu.server.kvm.costs import Costs
from vmmu.server.kvm.mmu_lock import MmuLock

W = AccessKind.WRITE
PAGE = 4096
BOUND_S = 60               # a simulation that stops making progress fails, not hangs
DESIGNS = {
    "read+rcu": dict(fault_lock="read", table_free="rcu"),
    "write": dict(fault_lock="write", table_free="rcu"),
    "read+write_section": dict(fault_lock="read", table_free="write_section"),
    "legacy": dict(mmu="legacy", fault_lock="write", table_free="rcu"),
}


def as_tasks(monkeypatch) -> None:
    """Make `gather` run its coroutines as tasks: the reference."""
    async def gather(self, *coros):
        return list(await asyncio.gather(*coros))
    monkeypatch.setattr(VirtualClock, "gather", gather)


def touch(first_gpa: int, pages: int, step: int = PAGE) -> AccessBatch:
    return AccessBatch.build([(first_gpa + i * step, W, 1, b"s") for i in range(pages)])


async def faults_and_invalidations(design: str, seed: int, backing=Backing.PAGE_4K) -> str:
    """8 vCPUs fault their own memory twice while a host actor invalidates ranges that
    overlap theirs: locks queue, tables are freed and made again. Everything the
    simulation says, as JSON."""
    vcpus, pages = 8, 48
    size = vcpus * pages * PAGE
    size = (size + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(max_vcpus=vcpus, clock="virtual", schedule_seed=seed,
                                sanitizers=True, fast_page_fault=False, aging_lock="read",
                                **DESIGNS[design]))
    region = vm.mmap(size, backing)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    for i in range(vcpus):
        vm.create_vcpu(i)
    clock = vm.clock

    async def host():
        async with clock.running(name="invalidator"):
            for k in range(6):
                await clock.sleep_until(clock.time() + 3_000)
                await vm.madvise_dontneed(region.hva + k * 5 * PAGE * pages // 4, 16 * PAGE)

    async def vcpu(i):
        first = await vm.vcpu(i).run(touch(i * pages * PAGE, pages))
        second = await vm.vcpu(i).run(touch(i * pages * PAGE, pages))
        return [first.start_ns, first.end_ns, second.start_ns, second.end_ns]

    spans = await asyncio.wait_for(clock.gather(host(), *[vcpu(i) for i in range(vcpus)]),
                                   BOUND_S)
    actors = [(a.name, a.time, a.busy_ns, a.wait_ns, a.events)
              for a in (vm.vcpu(i).actor for i in range(vcpus))]
    out = json.dumps(dict(spans=spans, actors=actors, stats=vm.stats(),
                          lock=vm.mmu_lock.statistics().__dict__,
                          trace=vm.sched.describe_trace(), now=clock.now,
                          dispatches=clock.dispatches), sort_keys=True, default=str)
    await kvm.shutdown()
    return out


@pytest.mark.parametrize("design", list(DESIGNS))
async def test_stepped_vcpus_give_what_tasks_give_to_the_byte(design, monkeypatch):
    for seed in (0, 3):
        stepped = await faults_and_invalidations(design, seed)
        with monkeypatch.context() as m:
            as_tasks(m)
            tasks = await faults_and_invalidations(design, seed)
        assert stepped == tasks, (design, seed)


async def test_stepped_vcpus_over_huge_pages_give_what_tasks_give(monkeypatch):
    stepped = await faults_and_invalidations("read+rcu", 1, Backing.THP)
    as_tasks(monkeypatch)
    assert stepped == await faults_and_invalidations("read+rcu", 1, Backing.THP)


async def many_vcpus(vcpus: int, pages: int) -> str:
    kvm = Kvm()
    vm = kvm.create_vm(VmConfig(max_vcpus=vcpus, clock="virtual", schedule_seed=4,
                                fast_page_fault=False))
    size = vcpus * pages * PAGE
    region = vm.mmap(size, Backing.PAGE_4K)
    await vm.set_user_memory_region(0, 0, 0, size, region.hva)
    for i in range(vcpus):
        vm.create_vcpu(i)
    runs = await asyncio.wait_for(vm.clock.gather(*[
        vm.vcpu(i).run(touch(i * pages * PAGE, pages)) for i in range(vcpus)]), BOUND_S)
    out = json.dumps(dict(runs=[(r.start_ns, r.end_ns) for r in runs], stats=vm.stats(),
                          dispatches=vm.clock.dispatches), sort_keys=True)
    await kvm.shutdown()
    return out


async def test_more_stepped_vcpus_than_steps_between_loop_turns_give_what_tasks_give(
        monkeypatch):
    """All of them enter the simulation before it starts, as tasks do, however many."""
    vcpus = 2 * VirtualClock.YIELD_EVERY + 5
    stepped = await many_vcpus(vcpus, 3)
    as_tasks(monkeypatch)
    assert stepped == await many_vcpus(vcpus, 3)


def test_the_seeds_sweeps_give_what_tasks_give(monkeypatch):
    from vmmu.scale import QUICK, run_sweep
    options = {"seed002": dict(QUICK["seed002"], max_vcpus=8, seed=2),
               "seed003": dict(QUICK["seed003"], seed=2),
               "seed000": dict(QUICK["seed000"], seed=2)}
    stepped = {name: run_sweep(name, **o) for name, o in options.items()}
    as_tasks(monkeypatch)
    assert stepped == {name: run_sweep(name, **o) for name, o in options.items()}


# -- stepped coroutines behave as tasks -------------------------------------------------

def clock_with() -> VirtualClock:
    return VirtualClock(Costs({"lock_acquire": 0, "cacheline_transfer": 0}))


async def test_two_stepped_readers_own_the_lock_apart_and_a_writer_waits_for_both():
    clock = clock_with()
    lock = MmuLock(clock=clock)
    log = []

    async def reader(name):
        async with clock.running(Actor(name, 0)):
            await lock.acquire_read()
            lock.assert_held_read()
            log.append((name, "read", clock.time()))
            clock.charge(100)
            await clock.point()
            lock.release_read()

    async def writer():
        async with clock.running(Actor("w", 10)):
            await lock.acquire_write()
            lock.assert_held_write()
            log.append(("w", "write", clock.time()))
            lock.release_write()

    await asyncio.wait_for(clock.gather(reader("a"), reader("b"), writer()), BOUND_S)
    assert sorted(log[:2]) == [("a", "read", 0), ("b", "read", 0)]
    assert log[2] == ("w", "write", 100)


async def test_a_stepped_error_is_raised_after_the_others_end():
    clock = clock_with()
    ended = []

    async def fails():
        async with clock.running(Actor("f", 0)):
            clock.charge(10)
            await clock.point()
            raise ValueError("bad")

    async def works(name):
        async with clock.running(Actor(name, 0)):
            for _ in range(3):
                clock.charge(20)
                await clock.point()
        ended.append(name)

    with pytest.raises(ValueError, match="bad"):
        await asyncio.wait_for(clock.gather(works("a"), fails(), works("b")), BOUND_S)
    assert sorted(ended) == ["a", "b"] and clock.current is None


@pytest.mark.parametrize("mode", ["stepped", "tasks"])
async def test_cancelling_gather_cancels_each_coroutine_which_unwinds(mode, monkeypatch):
    if mode == "tasks":
        as_tasks(monkeypatch)
    clock = clock_with()
    lock = MmuLock(clock=clock)
    unwound = []
    inside: set[str] = set()
    both_inside = asyncio.Event()

    async def spinner(name):
        async with clock.running(Actor(name, 0)):
            try:
                async with lock.read:
                    inside.add(name)
                    if len(inside) == 2:
                        both_inside.set()
                    while True:
                        clock.charge(50)
                        await clock.point()
                        await asyncio.sleep(0)   # lets the loop run: gather's caller too
            finally:
                unwound.append((name, clock.holds_turn()))

    run = asyncio.ensure_future(clock.gather(spinner("a"), spinner("b")))
    await asyncio.wait_for(both_inside.wait(), BOUND_S)   # both hold the lock for read
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # The one that held the turn unwinds holding it; the other, cancelled in its wait
    # for the turn, unwinds without it, as a task does.
    assert sorted(holds for _, holds in unwound) == [False, True]
    stats = lock.statistics()
    assert (stats.readers, stats.writer, stats.waiters) == (0, False, 0)
    assert clock.current is None


async def waits_outside() -> list:
    clock = clock_with()
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    log = []

    async def asks():
        async with clock.running(Actor("asks", 0)):
            got = await clock.outside(answer)
            log.append(("asks", got, clock.time()))

    async def works():
        async with clock.running(Actor("works", 0)):
            for _ in range(4):
                clock.charge(100)
                await clock.point()
            log.append(("works", clock.time()))
            answer.set_result(42)

    await asyncio.wait_for(clock.gather(asks(), works()), BOUND_S)
    return log


async def test_a_stepped_actor_waits_outside_the_simulation_while_the_others_go_on(
        monkeypatch):
    stepped = await waits_outside()
    assert stepped[0] == ("works", 400) and stepped[1][:2] == ("asks", 42)
    as_tasks(monkeypatch)
    assert stepped == await waits_outside()


async def test_stepped_actors_and_a_task_actor_run_in_virtual_time_order():
    clock = clock_with()
    log = []

    def worker(name, start, step):
        async def body():
            async with clock.running(Actor(name, start)):
                for _ in range(3):
                    log.append((name, clock.time()))
                    clock.charge(step)
                    await clock.point()
        return body

    task = asyncio.ensure_future(worker("t", 50, 250)())
    await asyncio.wait_for(clock.gather(worker("a", 0, 300)(), worker("b", 0, 200)()),
                           BOUND_S)
    await task
    times = [t for _, t in log]
    assert times == sorted(times), log
    assert {name for name, _ in log} == {"a", "b", "t"}
