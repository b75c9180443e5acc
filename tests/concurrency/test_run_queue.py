"""The run queue: runs start in arrival order, at most one every TURNS_PER_RUN turns of
the event loop, and an idle queue costs no task switch."""

from __future__ import annotations

import asyncio

from vmmu.server.rpc.runqueue import TURNS_PER_RUN, RunQueue


class Turns:
    """Counts the event loop's turns (a callback that schedules itself each turn)."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_runs_start_in_order_one_every_few_turns():
    queue, turns, log = RunQueue(), Turns(), []

    async def run(name: str) -> None:
        await queue.admit()
        log.append((name, turns.count))

    await asyncio.gather(*(run(name) for name in "abcd"))
    turns.stop()
    assert [name for name, _ in log] == list("abcd")
    gaps = [later - earlier for (_, earlier), (_, later) in zip(log, log[1:])]
    assert all(gap >= TURNS_PER_RUN for gap in gaps), gaps


async def test_an_idle_queue_admits_without_a_task_switch():
    queue, ran = RunQueue(), []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())                   # ready: runs at the next switch
    await queue.admit()
    ran.append("admitted")
    await task
    assert ran == ["admitted", "other"]


async def test_a_waiter_cancelled_while_it_waits_is_skipped():
    queue, log = RunQueue(), []
    await queue.admit()                                   # the slot of this turn is taken

    async def run(name: str) -> None:
        await queue.admit()
        log.append(name)

    first = asyncio.create_task(run("first"))
    second = asyncio.create_task(run("second"))
    await asyncio.sleep(0)                                # both wait
    first.cancel()
    await second
    assert log == ["second"] and first.cancelled()
