"""GPC refresh against host invalidations: without refresh's wait-and-retry the explorer
finds a stale cache at once; with it, under either policy, no seed does.

tests/concurrency/test_explore.py runs seeds 0..499 of every scenario with every
protection on; these take the next 500.
"""

import pytest

from vmmu.server.kvm.explore import SCENARIOS, explore, run_scenario
from vmmu.server.kvm.sanitizers import STALE_GPC

FOUND_WITHIN = 50
GPC_SCENARIOS = ["gpc_refresh_vs_invalidate", "gpc_range_refresh_vs_invalidate"]
KNOB = frozenset({"gpc_refresh_no_check"})


def test_the_scenarios_are_listed_with_their_knob():
    assert {SCENARIOS[name].gpc_policy for name in GPC_SCENARIOS} == {"global", "range"}
    assert all(SCENARIOS[name].knobs == KNOB for name in GPC_SCENARIOS)


@pytest.mark.parametrize("scenario", GPC_SCENARIOS)
async def test_without_the_retry_check_the_explorer_finds_a_stale_cache(scenario):
    result = await explore(scenario, FOUND_WITHIN, KNOB)
    found = result.first_violation
    assert found is not None, f"{scenario}: no violation in {FOUND_WITHIN} seeds"
    assert found.oracle == STALE_GPC
    assert "gpc.refresh_before_valid" in found.trace


@pytest.mark.parametrize("scenario", GPC_SCENARIOS)
async def test_with_the_protections_on_500_more_seeds_are_clean(scenario):
    result = await explore(scenario, 500, first_seed=500)
    assert result.first_violation is None, result.first_violation
    assert result.seeds_run == 500


async def test_a_seed_replays_the_same_stale_cache():
    found = (await explore("gpc_refresh_vs_invalidate", FOUND_WITHIN, KNOB)).first_violation
    replay = await run_scenario("gpc_refresh_vs_invalidate", found.seed, KNOB)
    assert replay == found
