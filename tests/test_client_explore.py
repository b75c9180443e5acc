"""Schedule exploration through the clients: the server's answer as a dataclass, the
parallelism options (worker processes, Ray) passed on, and refusals as client errors."""

import pytest

from vmmu.client import Exploration, FailedPrecondition, InvalidArgument, SeedOutcome


async def test_a_violating_seed_comes_back_with_its_oracle(client):
    found = await client.explore("fast_pf_vs_invalidate", 12, knobs=["fast_pf_plain_write"])
    assert isinstance(found, Exploration) and isinstance(found.first_violation, SeedOutcome)
    assert found.seeds_run == found.first_violation.seed + 1
    assert found.first_violation.oracle and found.first_violation.trace
    pooled = await client.explore("fast_pf_vs_invalidate", 12, knobs=["fast_pf_plain_write"],
                                  workers=2)
    assert pooled == found


async def test_a_clean_exploration_runs_every_seed(client):
    assert await client.explore("tlb_vs_zap", 3, first_seed=5) == Exploration(3, None, 0)


@pytest.mark.parametrize("options,error,reason", [
    ({"ray": "not an address"}, InvalidArgument, "is not HOST:PORT"),
    ({"ray": "10.0.0.1:6379", "workers": 2}, InvalidArgument, "Ray cluster's CPUs")])
async def test_bad_ray_options_are_refused(client, options, error, reason):
    with pytest.raises(error, match=reason):
        await client.explore("tlb_vs_zap", 1, **options)


async def test_ray_missing_on_the_server_is_failed_precondition(client, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "vmmu.server.explore_ray", raising=False)
    with pytest.raises(FailedPrecondition, match=r"pip install 'vmmu\[ray\]'"):
        await client.explore("tlb_vs_zap", 1, ray="")
