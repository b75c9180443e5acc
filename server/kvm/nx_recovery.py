"""The NX huge page recovery worker: a pass of `Vm.recover_nx_huge_pages` every period.

KVM's `kvm_nx_huge_page_recovery_worker` (a kthread per VM, started at the first KVM_RUN)
wakes every `nx_huge_pages_recovery_period_ms` (0: one hour divided by the ratio, at
least one second) and zaps 1/`nx_huge_pages_recovery_ratio` of the possible NX huge pages
(nx_huge_pages.py); a ratio of 0 disables it. Here the VM's config gives both
(`VmConfig.nx_huge_pages_recovery_ratio`, `_period_ms`; the ratio defaults to 0, no worker),
and the worker is an asyncio task in wall time.

Invariant: the worker is never cancelled inside a pass (which may hold mmu_lock): `stop`
wakes it from its sleep and waits for the pass under way to end; a pass ends, since it
yields mmu_lock to waiters and zaps a bounded share. A VM that dies or goes ends the worker.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .errors import KvmError, VmBugged, einval

if TYPE_CHECKING:
    from .vm import Vm, VmConfig

__all__ = ["NxRecoveryWorker", "check_nx_recovery", "recovery_period_ms"]

ONE_HOUR_MS = 60 * 60 * 1000
MAX_DERIVED_RATIO = 3600          # a derived period is at least one second


def check_nx_recovery(config: "VmConfig") -> None:
    """EINVAL for a worker that could not run: a ratio or period outside a u32, a worker
    without the mitigation (nothing to recover), a period without a ratio (no worker to
    use it), or a VM in virtual time (its clock advances only with the simulation)."""
    ratio, period_ms = config.nx_huge_pages_recovery_ratio, config.nx_huge_pages_recovery_period_ms
    for name, value in (("ratio", ratio), ("period_ms", period_ms)):
        if not 0 <= value < 1 << 32:
            raise einval(f"nx_huge_pages_recovery_{name} {value} is not a u32")
    if period_ms and not ratio:
        raise einval("nx_huge_pages_recovery_period_ms needs a recovery ratio "
                     "(nx_huge_pages_recovery_ratio 0 runs no worker)")
    if ratio and not config.nx_huge_pages:
        raise einval("nx_huge_pages_recovery_ratio needs nx_huge_pages: there would be "
                     "no NX huge pages to recover")
    if ratio and config.clock != "wall":
        raise einval("the NX huge page recovery worker runs in wall time only; in virtual "
                     "time call recover_nx_huge_pages")


def recovery_period_ms(ratio: int, period_ms: int) -> int:
    """`calc_nx_huge_pages_recovery_period`: the given period, or one hour / ratio."""
    return period_ms or ONE_HOUR_MS // min(ratio, MAX_DERIVED_RATIO)


class NxRecoveryWorker:
    """The VM's recovery task: started once (`start`, at the first KVM_RUN), stopped at
    destruction (`stop`)."""

    def __init__(self, vm: "Vm", ratio: int, period_ms: int) -> None:
        self._vm = vm
        self.ratio = ratio
        self.period_s = recovery_period_ms(ratio, period_ms) / 1000
        self.passes = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def failure(self) -> BaseException | None:
        """What ended the worker, if anything but a stop or the VM's end did."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    def start(self) -> None:
        if self._task is None and not self._stopping.is_set():
            self._task = asyncio.create_task(self._work(), name=f"nx-recovery-{self._vm.id}")

    async def stop(self) -> None:
        """Wake the worker and wait until it is gone (a pass under way ends first)."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])

    async def _work(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.period_s)
                return                              # stopped while asleep
            except TimeoutError:
                pass
            try:
                await self._vm.recover_nx_huge_pages(self.ratio)
            except (KvmError, VmBugged):
                return                  # the VM died (the bug killed it) or was destroyed
            self.passes += 1
