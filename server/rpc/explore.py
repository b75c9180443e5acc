"""The servicer of schedule exploration (vmmu.v1.ExploreService)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from vmmu.server import explore_pool, pool
from vmmu.server.kvm import explore
from vmmu.server.kvm.limits import Limits
from vmmu.v1 import explore_pb2, explore_pb2_grpc

__all__ = ["ExploreServicer"]

Context = grpc.aio.ServicerContext


def _outcome(outcome: explore.Outcome | None) -> explore_pb2.SeedOutcome | None:
    if outcome is None:
        return None
    return explore_pb2.SeedOutcome(seed=outcome.seed, violation=outcome.violation or "",
                                   oracle=outcome.oracle, gfn=outcome.gfn,
                                   trace=outcome.trace, points=outcome.points)


class ExploreServicer(explore_pb2_grpc.ExploreServiceServicer):
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def ListScenarios(self, request: explore_pb2.ListScenariosRequest, context: Context
                            ) -> explore_pb2.ListScenariosResponse:
        return explore_pb2.ListScenariosResponse(scenarios=[
            explore_pb2.Scenario(name=s.name, summary=s.summary, knobs=sorted(s.knobs))
            for s in sorted(explore.SCENARIOS.values(), key=lambda s: s.name)])

    async def Explore(self, request: explore_pb2.ExploreRequest, context: Context
                      ) -> AsyncIterator[explore_pb2.ExploreResponse]:
        self.limits.check("explore_seeds", request.seeds, f"{request.seeds} seeds")
        async for step in explore_pool.explore_steps(
                request.scenario, request.seeds, frozenset(request.knobs), request.first_seed,
                request.progress_every, workers=max(1, request.workers),
                ray=pool.ray_option(request.ray, request.ray_address)):
            yield explore_pb2.ExploreResponse(seeds_run=step.seeds_run, done=step.done,
                                              first_violation=_outcome(step.first_violation),
                                              workers_lost=step.workers_lost)
