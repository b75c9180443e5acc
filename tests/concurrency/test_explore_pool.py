"""Exploration on worker processes gives the sequential explorer's answer.

The lowest violating seed, with the same trace, whatever the number of workers and the
order in which they finish; a worker that dies has its seeds run again, and a seed whose
worker always dies is reported, never counted as clean.
"""

import pytest

from vmmu.server import explore_pool, pool
from vmmu.server.explore_pool import (ATTEMPTS, CRASH_HOOK, WORKER_DIED, Chunk, Plan,
                                      explore_steps, open_workers)
from vmmu.server.kvm.errors import KvmError
from vmmu.server.kvm.explore import ExploreResult, Outcome, explore

PLAIN_WRITE = ("fast_pf_vs_invalidate", frozenset({"fast_pf_plain_write"}))  # 2, 4, 5, ...


async def last_step(*args, **kwargs):
    steps = [step async for step in explore_steps(*args, **kwargs)]
    assert all(not step.done for step in steps[:-1]) and steps[-1].done
    return steps[-1]


def test_the_plan_keeps_the_lowest_violation_whatever_comes_back_first():
    plan = Plan(first_seed=0, seeds=10, batch=5)
    low, high = plan.take(), plan.take()
    assert (low, high) == (Chunk(0, 5), Chunk(5, 5)) and plan.take() is None
    plan.finish(high, ExploreResult("s", frozenset(), 1, Outcome(5, "bad", "o")))
    assert not plan.over()                   # seeds below 5 are still running
    plan.finish(low, ExploreResult("s", frozenset(), 3, Outcome(2, "bad", "o")))
    assert plan.over() and plan.last_step().first_violation.seed == 2
    assert plan.last_step().seeds_run == 3


def test_chunks_beyond_a_violation_are_not_waited_for():
    plan = Plan(first_seed=0, seeds=40, batch=5)
    chunks = [plan.take() for _ in range(4)]                 # seeds 0..19
    plan.finish(chunks[2], ExploreResult("s", frozenset(), 3, Outcome(12, "bad", "o")))
    assert plan.take() is None                               # nothing more above 12
    plan.finish(chunks[0], ExploreResult("s", frozenset(), 5, None))
    assert not plan.over()                                   # 5..9 may hold a lower seed
    plan.finish(chunks[1], ExploreResult("s", frozenset(), 5, None))
    assert plan.over() and plan.last_step().seeds_run == 13  # chunk 15..19 still running
    plan.finish(chunks[3], ExploreResult("s", frozenset(), 5, Outcome(16, "bad", "o")))
    assert plan.over() and plan.last_step().first_violation.seed == 12


def test_a_chunk_whose_worker_died_runs_again_seed_by_seed_then_is_a_finding():
    plan = Plan(first_seed=10, seeds=3, batch=3)
    chunk = plan.take()
    plan.died(chunk, "exit 70")
    singles = [plan.take() for _ in range(3)]
    assert singles == [Chunk(10, 1), Chunk(11, 1), Chunk(12, 1)]
    plan.finish(singles[0], ExploreResult("s", frozenset(), 1, None))
    plan.finish(singles[2], ExploreResult("s", frozenset(), 1, None))
    for _ in range(ATTEMPTS - 1):
        plan.died(singles[1], "exit 70")
        assert plan.first_violation is None and not plan.over()
        singles[1] = plan.take()
    plan.died(singles[1], "exit 70")
    assert plan.over()
    found = plan.last_step()
    assert found.first_violation.seed == 11 and found.first_violation.oracle == WORKER_DIED
    assert found.workers_lost == 1 + ATTEMPTS


@pytest.mark.parametrize("scenario,knobs,first_seed,seeds,batch", [
    (*PLAIN_WRITE, 0, 10, 5),        # chunk 5..9 ends (at 5) before chunk 0..4 finds 2
    (*PLAIN_WRITE, 3, 12, 1),
    ("fault_vs_invalidate", frozenset({"skip_invalidate_retry"}), 1, 20, 2),
    ("tlb_vs_zap", frozenset(), 0, 16, 3)])
async def test_two_workers_find_what_one_process_finds(scenario, knobs, first_seed, seeds,
                                                        batch):
    alone = await explore(scenario, seeds, knobs, first_seed)
    async with open_workers(workers=2) as pool:
        steps = [step async for step in pool.explore_steps(scenario, seeds, knobs,
                                                           first_seed, 1, batch)]
    last = steps[-1]
    assert (last.seeds_run, last.first_violation) == (alone.seeds_run, alone.first_violation)
    assert last.workers_lost == 0
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]


async def test_a_worker_that_dies_once_is_retried(monkeypatch, tmp_path):
    scenario, knobs = PLAIN_WRITE
    alone = await explore(scenario, 12, knobs)
    marker = tmp_path / "died"
    monkeypatch.setenv(CRASH_HOOK, f"{alone.first_violation.seed}:{marker}")
    last = await last_step(scenario, 12, knobs, workers=2)
    assert marker.exists()                   # the worker did die
    assert last.first_violation == alone.first_violation
    assert last.workers_lost == 1


async def test_a_seed_whose_worker_always_dies_is_reported_not_clean(monkeypatch):
    monkeypatch.setenv(CRASH_HOOK, "7")
    last = await last_step("tlb_vs_zap", 12, workers=2)
    found = last.first_violation
    assert found is not None and found.seed == 7 and found.oracle == WORKER_DIED
    assert f"status {pool.CRASH_STATUS}" in found.violation
    assert last.workers_lost >= ATTEMPTS and last.seeds_run == 8


async def test_a_lower_violation_wins_over_a_dead_worker(monkeypatch):
    monkeypatch.setenv(CRASH_HOOK, "9")
    scenario, knobs = PLAIN_WRITE
    last = await last_step(scenario, 12, knobs, workers=2)
    assert last.first_violation.seed == 2 and last.first_violation.oracle != WORKER_DIED


async def test_workers_are_bounded():
    with pytest.raises(KvmError, match="workers 0"):
        await last_step("tlb_vs_zap", 4, workers=0)
    with pytest.raises(KvmError, match=f"workers {explore_pool.MAX_WORKERS + 1}"):
        await last_step("tlb_vs_zap", 4, workers=explore_pool.MAX_WORKERS + 1)
    with pytest.raises(KvmError, match="unknown scenario"):
        await last_step("nope", 4, workers=2)

