"""Preemption points: the named places where real KVM can be preempted or raced.

`await sched.point("fast_pf.cas")` marks such a place. In normal runs a point awaits an
already-finished awaitable: no task switch, next to no cost. Deterministic schedules (a
seeded scheduler choosing the next runnable task at each point) plug in here.
"""

from __future__ import annotations

__all__ = ["Scheduler", "POINTS"]

POINTS = (
    "fault.after_seq_snapshot",   # between mmu_seq snapshot and the pfn lookup
    "fault.hva_to_pfn",           # the pfn lookup may sleep
    "fault.before_lock",          # pfn resolved, mmu_lock not yet taken
    "vcpu.retry",                 # RET_PF_RETRY: the vCPU re-enters the guest
)


class _Done:
    __slots__ = ()

    def __await__(self):
        return
        yield  # pragma: no cover - makes this a generator that finishes at once


_DONE = _Done()


class Scheduler:
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.hits: dict[str, int] | None = None     # per-point counts when tracing

    def point(self, name: str) -> _Done:
        if self.hits is not None:
            self.hits[name] = self.hits.get(name, 0) + 1
        return _DONE
