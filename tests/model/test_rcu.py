"""RCU: a callback waits for exactly the read sections active when it was queued."""

from __future__ import annotations

import asyncio

from vmmu.server.kvm import AccessBatch, AccessKind
from vmmu.server.kvm.mmu_page import POISON
from vmmu.server.kvm.rcu import Rcu


def test_callback_without_readers_runs_at_once():
    rcu, log = Rcu(), []
    rcu.call_rcu(lambda: log.append("freed"))
    assert log == ["freed"] and rcu.pending == 0


def test_callback_waits_for_the_sections_active_at_call_time():
    rcu, log = Rcu(), []
    a, b = rcu.read_lock(), rcu.read_lock()
    a.__enter__()
    b.__enter__()
    rcu.call_rcu(lambda: log.append("freed"))
    late = rcu.read_lock()
    late.__enter__()                  # began after call_rcu: does not hold the callback
    a.__exit__(None, None, None)
    assert log == [] and rcu.pending == 1
    b.__exit__(None, None, None)
    assert log == ["freed"]
    assert rcu.in_reader()            # `late` is still inside
    late.__exit__(None, None, None)
    assert not rcu.in_reader()


def test_callbacks_run_in_order_each_after_its_own_grace_period():
    rcu, log = Rcu(), []
    first = rcu.read_lock()
    first.__enter__()
    rcu.call_rcu(lambda: log.append(1))
    second = rcu.read_lock()
    second.__enter__()
    rcu.call_rcu(lambda: log.append(2))
    second.__exit__(None, None, None)
    assert log == []                  # 2 also waits for `first`, and 1 is ahead of it
    first.__exit__(None, None, None)
    assert log == [1, 2]
    assert rcu.callbacks_run == 2


def test_a_section_that_raises_still_ends():
    rcu, log = Rcu(), []
    try:
        with rcu.read_lock():
            rcu.call_rcu(lambda: log.append("freed"))
            raise RuntimeError("walker failed")
    except RuntimeError:
        pass
    assert log == ["freed"]


async def test_synchronize_waits_for_a_reader_across_awaits():
    rcu, log = Rcu(), []
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def reader():
        with rcu.read_lock():
            inside.set()
            await leave.wait()
            log.append("reader done")

    task = asyncio.create_task(reader())
    await inside.wait()

    async def updater():
        await rcu.synchronize()
        log.append("grace period")

    waiting = asyncio.create_task(updater())
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == []
    leave.set()
    await asyncio.gather(task, waiting)
    assert log == ["reader done", "grace period"]


async def test_tables_unlinked_by_a_zap_are_freed_after_the_readers_leave(kvm_guest):
    vm = kvm_guest.vm
    await kvm_guest.vcpu.run(AccessBatch.build([(0x1000, AccessKind.READ, 8, None)]))
    tables = vm.mmu.tables
    below_root = [tables.child(s.pfn) for s in vm.walk(0x1000) if s.kind == "table"][1:]
    assert len(below_root) == 1 and len(tables) == 3      # root -> L3 -> L2 (a 2M leaf)

    with vm.rcu.read_lock():                              # a lockless walker is inside
        await vm.set_user_memory_region(0, 0, 0, 0, 0)    # delete: zap every root
        assert tables.freed == 0 and vm.rcu.pending == 2
        assert not any(page.freed for page in below_root)
    assert tables.freed == 2
    assert all(page.freed and set(page.spt) == {POISON} for page in below_root)
