"""Exploration and `vmmu scale`'s sweeps as Ray tasks on a local Ray cluster give the
sequential explorer's answer and one process's rows.

The cluster is started here with two CPUs; with `VMMU_POOL_CRASH` set when it starts,
its workers exit abruptly on seed DOOMED, which no other test runs.
"""

import asyncio
import os

import pytest

from vmmu.server.explore_pool import ATTEMPTS, CRASH_HOOK, WORKER_DIED, explore_steps
from vmmu.server.kvm.explore import explore

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vmmu[ray]')")

DOOMED = 10_007


@pytest.fixture(scope="module")
def cluster():
    os.environ[CRASH_HOOK] = str(DOOMED)       # inherited by the cluster's workers
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    finally:
        del os.environ[CRASH_HOOK]
    yield
    ray.shutdown()


async def last_step(*args, **kwargs):
    steps = [step async for step in explore_steps(*args, ray="", **kwargs)]
    assert all(not step.done for step in steps[:-1]) and steps[-1].done
    return steps[-1]


@pytest.mark.parametrize("scenario,knobs,first_seed,seeds", [
    ("fast_pf_vs_invalidate", frozenset({"fast_pf_plain_write"}), 3, 12),
    ("tlb_vs_zap", frozenset(), 0, 10)])
async def test_ray_tasks_find_what_one_process_finds(cluster, scenario, knobs, first_seed,
                                                     seeds):
    alone = await explore(scenario, seeds, knobs, first_seed)
    last = await last_step(scenario, seeds, knobs, first_seed, 1)
    assert (last.seeds_run, last.first_violation) == (alone.seeds_run, alone.first_violation)
    assert last.workers_lost == 0


async def test_a_seed_whose_ray_worker_dies_is_reported_not_clean(cluster):
    last = await last_step("tlb_vs_zap", 12, frozenset(), DOOMED - 5)
    found = last.first_violation
    assert found is not None and found.seed == DOOMED and found.oracle == WORKER_DIED
    assert "Ray lost" in found.violation and last.workers_lost >= ATTEMPTS


async def test_scale_sweeps_as_ray_tasks_give_the_rows_of_one_process(cluster):
    from test_scale_pool import fanned_out, one_process
    alone = await asyncio.to_thread(one_process)
    assert await fanned_out(1, ray="") == (alone, 0)


async def test_the_rpc_runs_seeds_as_ray_tasks_with_the_server_process_answer(cluster,
                                                                               server):
    import grpc
    from vmmu.v1 import explore_pb2, explore_pb2_grpc
    request = dict(scenario="fast_pf_vs_invalidate", seeds=12, knobs=["fast_pf_plain_write"])
    async with grpc.aio.insecure_channel(server.address) as channel:
        explorer = explore_pb2_grpc.ExploreServiceStub(channel)
        alone = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(**request))]
        on_ray = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(
            **request, ray=True))]
        with pytest.raises(grpc.aio.AioRpcError) as busy:     # Ray is the cluster's here
            async for _ in explorer.Explore(explore_pb2.ExploreRequest(
                    **request, ray=True, ray_address="10.0.0.1:6379")):
                pass
    assert on_ray[-1] == alone[-1] and alone[-1].first_violation.oracle
    assert busy.value.code() is grpc.StatusCode.FAILED_PRECONDITION
