"""`vmmu explore`: schedule exploration on local worker processes or Ray, with progress.

One exploration prints the lowest violating seed with its oracle and trace, or that every
seed passed; `--all` prints a table of every scenario with every protection on and with
each debug knob off. Progress goes to stderr: a bar on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import sys
import time

from vmmu import event_loop
from vmmu.server.explore_pool import open_workers
from vmmu.server.kvm.explore import SCENARIOS, ExploreStep
from vmmu.server.kvm.vm import DEBUG_KNOBS

__all__ = ["run_explore", "run_explore_all"]

BAR = 30
LINES = 10                   # plain progress lines per exploration, off a terminal
ALL_ON = "none"              # the --all column with every protection on


class _Progress:
    """Seeds done of one exploration, on stderr: a bar redrawn on a terminal, else up to
    `lines` plain lines (1: only when it is over)."""

    def __init__(self, label: str, total: int, lines: int = LINES) -> None:
        self.label, self.total, self.lines = label, total, lines
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = 0

    def show(self, step: ExploreStep) -> None:
        done = step.seeds_run
        rate = done / max(time.monotonic() - self.started, 1e-9)
        if self.tty:
            filled = BAR * done // self.total
            print(f"\r{self.label} [{'#' * filled}{'.' * (BAR - filled)}] {done}/"
                  f"{self.total} seeds  {rate:.0f}/s", end="", file=sys.stderr, flush=True)
            if step.done:
                print(file=sys.stderr)
            return
        part = self.lines * done // self.total
        if step.done or part > self.shown:
            self.shown = part
            print(f"{self.label}: {done}/{self.total} seeds  {rate:.0f}/s",
                  file=sys.stderr, flush=True)


async def _run(pool, progress: _Progress, scenario: str, seeds: int, knobs: frozenset[str],
               first_seed: int) -> ExploreStep:
    every = max(1, seeds // 100)
    async for step in pool.explore_steps(scenario, seeds, knobs, first_seed, every):
        progress.show(step)
    return step


async def _explore(scenario: str, seeds: int, knobs: frozenset[str], first_seed: int,
                   workers: int, ray: str | None) -> int:
    async with open_workers(workers, ray) as pool:
        last = await _run(pool, _Progress(scenario, seeds), scenario, seeds, knobs,
                          first_seed)
    off = ", ".join(sorted(knobs)) or "none"
    if last.workers_lost:
        print(f"{scenario}: {last.workers_lost} worker(s) died; their seeds ran again")
    found = last.first_violation
    if found is None:
        print(f"{scenario}: all {seeds} seeds passed (seeds {first_seed}.."
              f"{first_seed + seeds - 1}, protections off: {off})")
        return 0
    print(f"{scenario}: seed {found.seed} violates {found.oracle} after {last.seeds_run} "
          f"seeds (protections off: {off})")
    print(f"  {found.violation}")
    return 1


async def _explore_all(seeds: int, first_seed: int, workers: int, ray: str | None) -> int:
    columns = [ALL_ON, *sorted(DEBUG_KNOBS)]
    cells = len(SCENARIOS) * len(columns)
    found: dict[tuple[str, str], ExploreStep] = {}
    async with open_workers(workers, ray) as pool:
        for scenario in sorted(SCENARIOS):
            for column in columns:
                knobs = frozenset() if column == ALL_ON else frozenset({column})
                progress = _Progress(f"[{len(found) + 1}/{cells}] {scenario} {column}",
                                     seeds, lines=1)
                found[scenario, column] = await _run(pool, progress, scenario, seeds, knobs,
                                                     first_seed)
    print(f"first violating seed of {first_seed}..{first_seed + seeds - 1}, per scenario "
          f"and protection switched off")
    rows = [["scenario", *columns]] + [
        [scenario, *(_cell(found[scenario, column]) for column in columns)]
        for scenario in sorted(SCENARIOS)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    for row in rows:
        print("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
    lost = sum(step.workers_lost for step in found.values())
    if lost:
        print(f"{lost} worker(s) died; their seeds ran again")
    return int(any(found[scenario, ALL_ON].first_violation for scenario in SCENARIOS))


def _cell(step: ExploreStep) -> str:
    return "clean" if step.first_violation is None else f"seed {step.first_violation.seed}"


def run_explore(scenario: str, seeds: int, knobs: frozenset[str], first_seed: int = 0,
                workers: int = 1, ray: str | None = None) -> int:
    """One exploration; exit status 1 if a seed violated."""
    return event_loop.run(_explore(scenario, seeds, knobs, first_seed, workers, ray))


def run_explore_all(seeds: int, first_seed: int = 0, workers: int = 1,
                    ray: str | None = None) -> int:
    """Every scenario with every protection on and with each knob off; exit status 1 if
    a scenario violated with every protection on."""
    return event_loop.run(_explore_all(seeds, first_seed, workers, ray))
