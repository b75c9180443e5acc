"""The run queue: runs start in arrival order, each after the turns of the event loop that
the run before it was given (one per completion gRPC brings for it and one spare), and an
idle queue costs no task switch; the servicers charge a RunBatch call and a Run stream's
step their own completions."""

from __future__ import annotations

import asyncio

import pytest

from vmmu.client import BatchBuilder, ExitReason
from vmmu.server.rpc.runqueue import (RUN_BATCH_COMPLETIONS, RUN_STEP_COMPLETIONS, RunQueue,
                                      turns_after)


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


async def test_each_run_starts_after_the_turns_of_the_one_before():
    queue, turns, log = RunQueue(), Turns(), []
    completions = {"a": RUN_BATCH_COMPLETIONS, "b": RUN_STEP_COMPLETIONS,
                   "c": RUN_STEP_COMPLETIONS, "d": RUN_BATCH_COMPLETIONS}

    async def run(name: str) -> None:
        await queue.admit(completions[name])
        log.append((name, turns.count))

    await asyncio.gather(*(run(name) for name in "abcd"))
    turns.stop()
    assert [name for name, _ in log] == list("abcd")
    gaps = [(earlier_name, later - earlier)
            for (earlier_name, earlier), (_, later) in zip(log, log[1:])]
    # The next run waits a turn for each completion of the one before it and a spare one
    # (`turns_after`), and not the turns of the other kind (at most one turn more: the
    # turn of the admission itself).
    assert all(completions[name] + 1 == turns_after(completions[name]) <= gap
               <= completions[name] + 2 for name, gap in gaps), gaps


async def test_an_idle_queue_admits_without_a_task_switch():
    queue, ran = RunQueue(), []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())                   # ready: runs at the next switch
    await queue.admit(RUN_STEP_COMPLETIONS)
    ran.append("admitted")
    await task
    assert ran == ["admitted", "other"]


async def test_a_waiter_cancelled_while_it_waits_is_skipped():
    queue, log = RunQueue(), []
    await queue.admit(RUN_STEP_COMPLETIONS)               # the turns after it are taken

    async def run(name: str) -> None:
        await queue.admit(RUN_STEP_COMPLETIONS)
        log.append(name)

    first = asyncio.create_task(run("first"))
    second = asyncio.create_task(run("second"))
    await asyncio.sleep(0)                                # both wait
    first.cancel()
    await second
    assert log == ["second"] and first.cancelled()


@pytest.fixture
def charged(monkeypatch) -> list[int]:
    """The completions each run admitted on the servers of the test was charged."""
    charges: list[int] = []
    admit = RunQueue.admit

    async def recording(queue: RunQueue, completions: int) -> None:
        charges.append(completions)
        await admit(queue, completions)

    monkeypatch.setattr(RunQueue, "admit", recording)
    return charges


async def test_a_run_batch_call_and_a_stream_step_are_charged_their_completions(charged, guest):
    _, _, vcpu = guest
    batch = BatchBuilder().write(0x1000, data=b"12345678").build()
    assert (await vcpu.run(batch)).exit.reason is ExitReason.DONE
    async with vcpu.stream() as stream:
        assert (await stream.run(batch)).exit.reason is ExitReason.DONE
        assert (await stream.run(batch)).exit.reason is ExitReason.DONE
    assert charged == [RUN_BATCH_COMPLETIONS, RUN_STEP_COMPLETIONS, RUN_STEP_COMPLETIONS]
