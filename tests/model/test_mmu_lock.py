"""mmu_lock: shared readers, an exclusive writer, FIFO hand-over, cancellation, contracts."""

from __future__ import annotations

import asyncio

import pytest

from vmmu.server.kvm.mmu_lock import LockAssertion, MmuLock


async def settle():
    """Let every runnable task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Holders:
    """Tasks that take the lock, log (event, name), and hold it until released by name."""

    def __init__(self, lock: MmuLock) -> None:
        self.lock, self.log, self.tasks = lock, [], {}
        self._release: dict[str, asyncio.Event] = {}

    def start(self, name: str, mode: str) -> asyncio.Task:
        self._release[name] = asyncio.Event()
        task = asyncio.create_task(self._hold(name, mode))
        self.tasks[name] = task
        return task

    async def _hold(self, name: str, mode: str) -> None:
        async with getattr(self.lock, mode):
            self.log.append(("got", name))
            await self._release[name].wait()
        self.log.append(("released", name))

    def release(self, name: str) -> None:
        self._release[name].set()

    def got(self) -> list[str]:
        return [name for event, name in self.log if event == "got"]


@pytest.fixture
def holders():
    return Holders(MmuLock())


async def test_readers_share(holders):
    for name in ("r1", "r2", "r3"):
        holders.start(name, "read")
    await settle()
    assert holders.got() == ["r1", "r2", "r3"]
    assert holders.lock.statistics().readers == 3


async def test_writer_excludes_readers_and_writers(holders):
    holders.start("w1", "write")
    await settle()
    holders.start("r1", "read")
    holders.start("w2", "write")
    await settle()
    assert holders.got() == ["w1"]
    stats = holders.lock.statistics()
    assert stats.writer and stats.waiters == 2
    holders.release("w1")
    await settle()
    assert holders.got() == ["w1", "r1"]
    holders.release("r1")
    await settle()
    assert holders.got() == ["w1", "r1", "w2"]


async def test_a_queued_writer_blocks_new_readers(holders):
    holders.start("r1", "read")
    await settle()
    holders.start("w", "write")
    await settle()
    holders.start("r2", "read")                    # could share with r1, but w came first
    await settle()
    assert holders.got() == ["r1"]
    holders.release("r1")
    await settle()
    assert holders.got() == ["r1", "w"]
    holders.release("w")
    await settle()
    assert holders.got() == ["r1", "w", "r2"]


async def test_readers_at_the_head_are_granted_together(holders):
    holders.start("w1", "write")
    await settle()
    for name, mode in (("r1", "read"), ("r2", "read"), ("w2", "write"), ("r3", "read")):
        holders.start(name, mode)
    await settle()
    holders.release("w1")
    await settle()
    assert holders.got() == ["w1", "r1", "r2"]
    holders.release("r1")
    holders.release("r2")
    await settle()
    assert holders.got() == ["w1", "r1", "r2", "w2"]


async def test_cancelled_waiter_leaves_the_queue(holders):
    holders.start("w1", "write")
    await settle()
    waiter = holders.start("r1", "read")
    await settle()
    waiter.cancel()
    await settle()
    assert waiter.cancelled() and holders.lock.statistics().waiters == 0
    holders.release("w1")
    await settle()
    holders.start("w2", "write")
    await settle()
    assert holders.got() == ["w1", "w2"]


async def test_cancelled_writer_lets_the_readers_behind_it_in(holders):
    holders.start("r1", "read")
    await settle()
    writer = holders.start("w", "write")
    await settle()
    holders.start("r2", "read")
    await settle()
    writer.cancel()
    await settle()
    assert writer.cancelled()
    assert holders.got() == ["r1", "r2"]


@pytest.mark.parametrize("mode", ["read", "write"])
async def test_waiter_cancelled_just_before_the_lock_is_released(holders, mode):
    """The release pops the cancelled entry before the waiter runs its cleanup."""
    lock = holders.lock
    await lock.acquire_write()
    waiter = holders.start("w", mode)
    await settle()
    waiter.cancel()
    lock.release_write()                           # same step: the waiter has not run yet
    await settle()
    assert waiter.cancelled()                      # CancelledError, not a stray exception
    stats = lock.statistics()
    assert (stats.readers, stats.writer, stats.waiters) == (0, False, 0)
    holders.start("r", "read")
    await settle()
    assert holders.got() == ["r"]


async def test_grant_then_cancel_does_not_leak_the_lock(holders):
    holders.start("w1", "write")
    await settle()
    waiter = holders.start("w2", "write")
    await settle()
    holders.release("w1")
    await asyncio.sleep(0)          # w1 leaves and hands the lock to w2, which has not run
    waiter.cancel()
    await settle()
    assert waiter.cancelled() and "w2" not in holders.got()
    stats = holders.lock.statistics()
    assert (stats.readers, stats.writer, stats.waiters) == (0, False, 0)


async def test_assertions_outside_the_lock():
    lock = MmuLock()
    for check in (lock.assert_held, lock.assert_held_read, lock.assert_held_write):
        with pytest.raises(LockAssertion):
            check()
    with pytest.raises(LockAssertion):
        lock.release_read()
    with pytest.raises(LockAssertion):
        lock.release_write()


async def test_assertions_distinguish_read_from_write():
    lock = MmuLock()
    async with lock.read:
        lock.assert_held()
        lock.assert_held_read()
        assert not lock.held_for_write()
        with pytest.raises(LockAssertion):
            lock.assert_held_write()
    async with lock.write:
        lock.assert_held()
        lock.assert_held_write()
        assert lock.held_for_write()
        with pytest.raises(LockAssertion):
            lock.assert_held_read()


async def test_another_tasks_hold_does_not_count():
    lock = MmuLock()
    await lock.acquire_write()

    async def other():
        with pytest.raises(LockAssertion):
            lock.assert_held_write()
        with pytest.raises(LockAssertion):
            lock.release_write()

    await asyncio.create_task(other())
    lock.release_write()


@pytest.mark.parametrize("first, second", [("read", "read"), ("read", "write"),
                                           ("write", "read"), ("write", "write")])
async def test_recursion_is_a_bug(first, second):
    lock = MmuLock()
    async with getattr(lock, first):
        with pytest.raises(LockAssertion):
            await getattr(lock, f"acquire_{second}")()


def test_the_holder_is_known_in_each_event_loop_the_lock_runs_in():
    """The lock finds the running task through the loop it last ran in: run again from
    another event loop, it still tells its holder from another task."""
    lock = MmuLock()

    async def hold_then_release_from_elsewhere(mode: str) -> None:
        await getattr(lock, f"acquire_{mode}")()
        release = getattr(lock, f"release_{mode}")

        async def other():
            with pytest.raises(LockAssertion):
                release()
        await asyncio.create_task(other())
        release()
        stats = lock.statistics()
        assert (stats.readers, stats.writer) == (0, False)

    for mode in ("read", "write", "read"):
        asyncio.run(hold_then_release_from_elsewhere(mode))   # a new event loop each time
