"""ExploreService over a real server: scenarios, progress, the first violation, errors,
and the same answer from worker processes."""

import sys

import grpc
import pytest

from vmmu.server.explore_pool import ATTEMPTS, CRASH_HOOK, WORKER_DIED
from vmmu.v1 import explore_pb2, explore_pb2_grpc


@pytest.fixture
async def explorer(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield explore_pb2_grpc.ExploreServiceStub(channel)


async def test_scenarios_are_listed_with_their_knobs(explorer):
    scenarios = (await explorer.ListScenarios(explore_pb2.ListScenariosRequest())).scenarios
    by_name = {s.name: s for s in scenarios}
    assert list(by_name["tlb_vs_zap"].knobs) == ["skip_zap_tlb_flush"]
    assert all(s.summary for s in scenarios)


async def test_progress_then_the_first_violation(explorer):
    replies = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(
        scenario="tlb_vs_zap", seeds=30, knobs=["skip_zap_tlb_flush"], progress_every=1))]
    last = replies[-1]
    assert last.done and last.first_violation.oracle == "stale-translation"
    assert last.first_violation.trace and last.first_violation.violation
    assert all(not r.done for r in replies[:-1])


async def test_clean_exploration_reports_every_seed(explorer):
    replies = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(
        scenario="fault_vs_invalidate", seeds=20, first_seed=100, progress_every=10))]
    assert [(r.seeds_run, r.done) for r in replies] == [(10, False), (20, True)]
    assert not replies[-1].HasField("first_violation")


@pytest.mark.parametrize("request_fields,reason", [
    ({"scenario": "nope", "seeds": 1}, "unknown scenario"),
    ({"scenario": "tlb_vs_zap", "seeds": 0}, "seeds 0"),
    ({"scenario": "tlb_vs_zap", "seeds": 1, "knobs": ["bogus"]}, "unknown debug knobs"),
    ({"scenario": "tlb_vs_zap", "seeds": 1, "ray": True, "ray_address": "10.0.0.1"},
     "Ray address '10.0.0.1' is not HOST:PORT"),
    ({"scenario": "tlb_vs_zap", "seeds": 1, "ray": True, "ray_address": "h:99999"},
     "is not HOST:PORT"),
    ({"scenario": "tlb_vs_zap", "seeds": 1, "ray_address": "10.0.0.1:6379"},
     "a Ray address (10.0.0.1:6379) without Ray"),
    ({"scenario": "tlb_vs_zap", "seeds": 1, "ray": True, "ray_address": "10.0.0.1:6379",
      "workers": 2}, "the Ray cluster's CPUs set the parallelism")])
async def test_bad_requests_get_invalid_argument(explorer, request_fields, reason):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in explorer.Explore(explore_pb2.ExploreRequest(**request_fields)):
            pass
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason in failed.value.details()
    assert not ray_connected()                        # nothing was started


def ray_connected() -> bool:
    explore_ray = sys.modules.get("vmmu.server.explore_ray")
    return explore_ray is not None and explore_ray._Connection.users > 0


async def test_ray_missing_on_the_server_is_failed_precondition(explorer, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)         # import ray fails
    monkeypatch.delitem(sys.modules, "vmmu.server.explore_ray", raising=False)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in explorer.Explore(explore_pb2.ExploreRequest(
                scenario="tlb_vs_zap", seeds=1, ray=True)):
            pass
    assert failed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "Ray is not installed: pip install 'vmmu[ray]'" in failed.value.details()


@pytest.mark.parametrize("request_fields", [
    {"scenario": "fast_pf_vs_invalidate", "seeds": 12, "knobs": ["fast_pf_plain_write"]},
    {"scenario": "tlb_vs_zap", "seeds": 10, "first_seed": 7}])
async def test_worker_processes_give_the_same_result_as_the_server_process(explorer,
                                                                          request_fields):
    async def last(**workers):
        replies = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(
            **request_fields, progress_every=3, **workers))]
        assert [r.done for r in replies] == [False] * (len(replies) - 1) + [True]
        return replies[-1]
    alone, pooled = await last(), await last(workers=2)
    assert pooled == alone and pooled.workers_lost == 0


async def test_too_many_workers_get_invalid_argument(explorer):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in explorer.Explore(explore_pb2.ExploreRequest(
                scenario="tlb_vs_zap", seeds=1, workers=65)):
            pass
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "workers 65 is not in 1..64" in failed.value.details()


async def test_a_seed_whose_worker_always_dies_is_reported(explorer, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK, "9")
    replies = [r async for r in explorer.Explore(explore_pb2.ExploreRequest(
        scenario="tlb_vs_zap", seeds=12, workers=2))]
    found = replies[-1].first_violation
    assert (found.seed, found.oracle) == (9, WORKER_DIED)
    assert replies[-1].workers_lost >= ATTEMPTS and replies[-1].seeds_run == 10
