"""Sanitizers: the oracles that say the model did what KVM promises, checked as it runs.

- `stale-translation`: every access a vCPU completes used the pfn the host maps for that
  gfn's hva at that moment, and no access used a mapping of a range whose invalidation has
  begun and not ended (the MMU-notifier contract: once start returns, no vCPU uses an old
  mapping);
- `no-new-mapping-during-invalidation`: no leaf SPTE is installed for a gfn whose hva is in
  a range between invalidation begin and end;
- `stale-gpc`: a valid gfn-to-pfn cache, whenever it is used or a refresh has just made
  it valid, maps the pfn the host maps at its uhva now, and no invalidation in flight
  (from the top of invalidate_range_start to the bottom of _end) covers its page;
- use-after-free of page-table pages is caught where tables are read (`UseAfterFree`);
- lock contracts are asserted by `MmuLock` wherever they are stated.

A violation raises `SanitizerViolation`, a `VmBugged`: the VM stops with an error that
names the oracle, the gfn and the trail of preemption points that led there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import VmBugged
from .types import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, pages_per_level

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["Sanitizers", "SanitizerViolation", "STALE_TRANSLATION", "NO_NEW_MAPPING",
           "STALE_GPC"]

STALE_TRANSLATION = "stale-translation"
NO_NEW_MAPPING = "no-new-mapping-during-invalidation"
STALE_GPC = "stale-gpc"


class SanitizerViolation(VmBugged):
    def __init__(self, oracle: str, gfn: int, detail: str, trace: str) -> None:
        self.oracle, self.gfn, self.detail, self.trace = oracle, gfn, detail, trace
        super().__init__(f"sanitizer {oracle}: gfn {gfn:#x}: {detail}; "
                         f"preemption points: {trace or '(none)'}")


class Sanitizers:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.invalidating: list[tuple[int, int]] = []   # hva ranges begun, not ended
        self.accesses_checked = 0
        self.mappings_checked = 0
        self.gpcs_checked = 0

    # -- invalidation windows (called under mmu_lock held for write) -------------------

    def invalidation_begun(self, start: int, end: int) -> None:
        self.invalidating.append((start, end))

    def invalidation_ended(self, start: int, end: int) -> None:
        self.invalidating.remove((start, end))

    def _invalidating(self, hva_start: int, hva_end: int) -> bool:
        return any(s < hva_end and hva_start < e for s, e in self.invalidating)

    # -- the oracles -------------------------------------------------------------------

    def check_access(self, gfn: int, pfn: int) -> None:
        """A vCPU completed an access to gfn through pfn."""
        self.accesses_checked += 1
        slot = self.vm.memslot_sets[0].lookup(gfn)
        if slot is None:
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x} but no "
                           "memslot maps the gfn")
        hva = slot.gfn_to_hva(gfn)
        if self._invalidating(hva, hva + 1):
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x} while hva "
                           f"{hva:#x} is being invalidated")
        current = self.vm.host.current_pfn(hva)
        if current != pfn:
            host = "nothing" if current is None else f"pfn {current:#x}"
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x}, but the "
                           f"host maps {host} at hva {hva:#x}")

    def check_new_mapping(self, as_id: int, gfn: int, level: int) -> None:
        """A leaf SPTE for [gfn, gfn + pages at level) was just made present."""
        self.mappings_checked += 1
        slot = self.vm.memslot_sets[as_id].lookup(gfn)
        if slot is None:
            return
        hva = slot.gfn_to_hva(gfn)
        if self._invalidating(hva, hva + (pages_per_level(level) << PAGE_SHIFT)):
            self.violation(NO_NEW_MAPPING, gfn, f"level-{level} leaf installed while hva "
                           f"{hva:#x} is being invalidated")

    def check_gpc(self, gpc_id: int, gpa: int, uhva: int, pfn: int) -> None:
        """A valid gfn-to-pfn cache is used, or a refresh just made it valid."""
        self.gpcs_checked += 1
        page = uhva & PAGE_MASK
        if self.vm.notifier.invalidating(page, page + PAGE_SIZE):
            self.violation(STALE_GPC, gpa >> PAGE_SHIFT, f"gpc {gpc_id} is valid (pfn "
                           f"{pfn:#x}) while hva {uhva:#x} is being invalidated")
        current = self.vm.host.current_pfn(uhva)
        if current != pfn:
            host = "nothing" if current is None else f"pfn {current:#x}"
            self.violation(STALE_GPC, gpa >> PAGE_SHIFT, f"gpc {gpc_id} is valid with pfn "
                           f"{pfn:#x}, but the host maps {host} at hva {uhva:#x}")

    def violation(self, oracle: str, gfn: int, detail: str) -> None:
        raise SanitizerViolation(oracle, gfn, detail, self.vm.sched.describe_trace())
