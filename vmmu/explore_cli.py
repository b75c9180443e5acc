"""`vmmu explore`: schedule exploration in this process, with a progress bar."""

from __future__ import annotations

import asyncio
import sys
import time

from vmmu.server.kvm.explore import explore_steps

__all__ = ["run_explore"]

BAR = 30


def _bar(done: int, total: int, started: float) -> str:
    filled = BAR * done // total
    rate = done / max(time.monotonic() - started, 1e-9)
    return f"\r[{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} seeds  {rate:.0f}/s"


async def _explore(scenario: str, seeds: int, knobs: frozenset[str], first_seed: int) -> int:
    started = time.monotonic()
    every = max(1, seeds // 100)
    last = None
    async for step in explore_steps(scenario, seeds, knobs, first_seed, every):
        print(_bar(step.seeds_run, seeds, started), end="", file=sys.stderr, flush=True)
        last = step
    print(file=sys.stderr)
    off = ", ".join(sorted(knobs)) or "none"
    found = last.first_violation
    if found is None:
        print(f"{scenario}: all {seeds} seeds passed (seeds {first_seed}.."
              f"{first_seed + seeds - 1}, protections off: {off})")
        return 0
    print(f"{scenario}: seed {found.seed} violates {found.oracle} after {last.seeds_run} "
          f"seeds (protections off: {off})")
    print(f"  {found.violation}")
    return 1


def run_explore(scenario: str, seeds: int, knobs: frozenset[str], first_seed: int = 0) -> int:
    return asyncio.run(_explore(scenario, seeds, knobs, first_seed))
