"""Schedule exploration fanned out: an exploration's seeds run on worker processes or Ray.

A seed's run is deterministic and independent of every other, so the seeds are the unit of
work: they are handed out in batches of consecutive seeds (a `Chunk`), each batch run by
`explore()` of the model in a worker, in whatever order the workers finish. The result is
the sequential explorer's, whatever the parallelism: the LOWEST violating seed (with the
same trace), or that every seed passed. `Plan` keeps that invariant: no chunk beyond the
lowest violation found so far is handed out, and the exploration ends only once every
chunk below it has come back.

A worker that dies (its process exits, Ray loses it) is not a clean seed. Its chunk is
run again seed by seed; a seed whose worker dies `ATTEMPTS` times is reported as that
seed's outcome, oracle `worker-died`. Every death is counted (`workers_lost`).

    async with open_workers(workers=4) as pool:               # or ray="" / ray="ADDR"
        async for step in pool.explore_steps("tlb_vs_zap", 10_000, knobs): ...

The chunks are calls on a pool (server/pool.py): worker processes or Ray tasks; the
`Plan`, not the pool, decides what a dead worker's chunk becomes. One worker is the
model's own in-process explorer. The pool's crash hook (`CRASH_HOOK`) takes a seed here.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from vmmu import event_loop
from vmmu.server.kvm import explore as model
from vmmu.server.kvm.explore import ExploreResult, ExploreStep, Outcome
from vmmu.server.pool import (ATTEMPTS, CRASH_HOOK, MAX_WORKERS, RAY_INSTALL, Call, Pool,
                              RayMissing, WorkerDied, default_workers, drive, open_pool)

__all__ = ["ATTEMPTS", "CRASH_HOOK", "MAX_WORKERS", "RAY_INSTALL", "WORKER_DIED", "Chunk",
           "Plan", "RayMissing", "WorkerDied", "Workers", "default_workers", "open_workers",
           "explore_steps", "run_chunk"]

WORKER_DIED = "worker-died"


@dataclass(frozen=True, order=True)
class Chunk:
    """Seeds first .. first + count - 1 of one exploration."""

    first: int
    count: int


def run_chunk(scenario: str, knobs: frozenset[str], chunk: Chunk) -> ExploreResult:
    """A worker's body: the model's explorer over one chunk, in a loop of its own."""
    return event_loop.run(model.explore(scenario, chunk.count, knobs, chunk.first))


@dataclass
class Plan:
    """Which seeds of one exploration are handed out, running, and what came back.

    The bound is the lowest violating seed known (or the end): chunks are handed out
    lowest first and only below the bound, and the exploration is over when nothing
    below the bound is pending or running. Plain bookkeeping; no await in it, and
    O(log n) per chunk but when the bound moves (thousands of chunks run at once on a
    cluster, and the driver must keep up).
    """

    first_seed: int
    seeds: int
    batch: int
    next_seed: int = -1
    retries: list[Chunk] = field(default_factory=list)       # a heap
    running: set[Chunk] = field(default_factory=set)
    running_below: int = 0                                   # running chunks below bound
    first_violation: Outcome | None = None
    seeds_done: int = 0
    workers_lost: int = 0
    deaths: dict[int, int] = field(default_factory=dict)     # single seed -> deaths

    def __post_init__(self) -> None:
        self.next_seed = self.first_seed

    @property
    def bound(self) -> int:
        if self.first_violation is not None:
            return self.first_violation.seed
        return self.first_seed + self.seeds

    def take(self) -> Chunk | None:
        """The lowest chunk to run next, or None if nothing below the bound is left."""
        if self.retries and self.retries[0].first < self.bound:
            chunk = heapq.heappop(self.retries)
        elif self.next_seed < self.bound:
            chunk = Chunk(self.next_seed, min(self.batch, self.bound - self.next_seed))
            self.next_seed += chunk.count
        else:
            return None
        self.running.add(chunk)
        self.running_below += 1
        return chunk

    def _stopped(self, chunk: Chunk) -> None:
        self.running.remove(chunk)
        if chunk.first < self.bound:
            self.running_below -= 1

    def finish(self, chunk: Chunk, result: ExploreResult) -> None:
        self._stopped(chunk)
        self.seeds_done += result.seeds_run
        self._found(result.first_violation)

    def died(self, chunk: Chunk, reason: str) -> None:
        """The chunk's worker went away: run its seeds again, one per chunk; a seed
        whose worker dies ATTEMPTS times is that seed's outcome."""
        self._stopped(chunk)
        self.workers_lost += 1
        if chunk.count > 1:
            for seed in range(chunk.first, chunk.first + chunk.count):
                heapq.heappush(self.retries, Chunk(seed, 1))
            return
        deaths = self.deaths[chunk.first] = self.deaths.get(chunk.first, 0) + 1
        if deaths < ATTEMPTS:
            heapq.heappush(self.retries, chunk)
            return
        self.seeds_done += 1
        self._found(Outcome(chunk.first, f"the worker died {deaths} times running seed "
                                         f"{chunk.first}: {reason}", WORKER_DIED))

    def _found(self, outcome: Outcome | None) -> None:
        if outcome is not None and (self.first_violation is None
                                    or outcome.seed < self.first_violation.seed):
            self.first_violation = outcome
            self.running_below = sum(c.first < outcome.seed for c in self.running)

    def over(self) -> bool:
        return (self.next_seed >= self.bound and self.running_below == 0
                and not (self.retries and self.retries[0].first < self.bound))

    def last_step(self) -> ExploreStep:
        found = self.first_violation
        seeds_run = self.seeds if found is None else found.seed - self.first_seed + 1
        return ExploreStep(seeds_run, True, found, self.workers_lost)


class Workers:
    """An exploration's seeds on a pool (server/pool.py): the in-process pool runs the
    model's explorer in this loop, the others run chunks of seeds as calls."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.lanes = pool.lanes

    def batch(self, seeds: int) -> int:
        """Seeds per chunk: several chunks per lane, to keep every lane busy to the end."""
        pool = self.pool
        return max(1, min(pool.max_batch, seeds // (pool.lanes * pool.chunks_per_lane)))

    async def explore_steps(self, name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                            first_seed: int = 0, every: int = 0,
                            batch: int = 0) -> AsyncIterator[ExploreStep]:
        """As the model's `explore_steps`: progress every `every` seeds done (in any
        order), then the last step with the lowest violating seed."""
        model.check(name, seeds, knobs)
        if self.pool.lanes == 1:                 # this process: seed by seed, this loop
            async for step in model.explore_steps(name, seeds, knobs, first_seed, every):
                yield step
            return
        plan = Plan(first_seed, seeds, batch or self.batch(seeds))
        ordered = sorted(knobs)
        reported = 0

        def call(chunk: Chunk) -> Call:
            return Call(f"{__name__}:run_chunk_encoded", (name, ordered, chunk.first,
                                                          chunk.count),
                        (chunk.first, chunk.count))

        async for _ in drive(self.pool, plan, call, lambda reply: _decode(name, knobs, reply)):
            if every and plan.seeds_done // every > reported:
                reported = plan.seeds_done // every
                yield ExploreStep(plan.seeds_done, False, None, plan.workers_lost)
        yield plan.last_step()


def run_chunk_encoded(scenario: str, knobs: list[str], first: int, count: int) -> dict:
    """A worker's call: `run_chunk`, its result as JSON values."""
    result = run_chunk(scenario, frozenset(knobs), Chunk(first, count))
    found = result.first_violation
    return {"seeds_run": result.seeds_run,
            "first_violation": None if found is None else asdict(found)}


def _decode(scenario: str, knobs: frozenset[str], reply: dict) -> ExploreResult:
    found = reply["first_violation"]
    return ExploreResult(scenario, knobs, reply["seeds_run"],
                         None if found is None else Outcome(**found))


@asynccontextmanager
async def open_workers(workers: int = 1, ray: str | None = None) -> AsyncIterator[Workers]:
    """Workers for explorations: `workers` local processes (1: this process), or with
    `ray` Ray tasks on the cluster at that address ("" for a local cluster of `workers`
    CPUs); see `pool.open_pool`."""
    async with open_pool(workers, ray) as pool:
        yield Workers(pool)


async def explore_steps(name: str, seeds: int, knobs: frozenset[str] = frozenset(),
                        first_seed: int = 0, every: int = 0, *, workers: int = 1,
                        ray: str | None = None) -> AsyncIterator[ExploreStep]:
    """One exploration on its own workers (see `Workers.explore_steps`)."""
    model.check(name, seeds, knobs)
    async with open_workers(workers, ray) as pool:
        async for step in pool.explore_steps(name, seeds, knobs, first_seed, every):
            yield step

