"""Sanitizers: the oracles that say the model did what KVM promises, checked as it runs.

- `stale-translation`: every access a vCPU completes used the pfn the host maps for that
  gfn's hva at that moment (and a write never the zero page), and no access used a mapping of a range whose invalidation has
  begun and not ended (the MMU-notifier contract: once start returns, no vCPU uses an old
  mapping); for a private gfn, the page its memslot's guest_memfd holds at its index, and
  no access inside an invalidation by gfn (an attribute change, a guest_memfd hole);
- `no-new-mapping-during-invalidation`: no leaf SPTE is installed for a gfn whose hva is in
  a range between invalidation begin and end, or whose gfn is in an invalidation by gfn;
- `stale-gpc`: a valid gfn-to-pfn cache, whenever it is used or a refresh has just made
  it valid, maps the pfn the host maps at its uhva now, and no invalidation in flight
  (from the top of invalidate_range_start to the bottom of _end) covers its page;
- `no-lost-dirty-page`: every guest write to a dirty-logged slot appears in the next harvest
  that covers its page (GET_DIRTY_LOG, CLEAR_DIRTY_LOG, a dirty ring harvest or reset):
  from the write until that harvest the page stays recorded, by its bit in the slot's
  bitmap or by an entry in a vCPU's dirty ring that no reset has recycled. The vCPU
  reports each completed write (`guest_wrote`); a slot is watched from the moment
  enabling its log has returned until logging goes off;
- `invalid-root-maps-invalidated-range`: once an MMU-notifier invalidation has zapped and
  flushed, no root maps the range, invalid roots included (their zap may not have got
  there yet; the valid roots are checked by every access, by `stale-translation`);
- `root-freed-with-sptes`: a root whose last reference goes is empty: every zap of an
  invalid root has run, and no fault mapped into it after it was zapped (a table left
  under it would never be freed);
- use-after-free of page-table pages is caught where tables are read (`UseAfterFree`);
- lock contracts are asserted by `MmuLock` wherever they are stated.

A violation raises `SanitizerViolation`, a `VmBugged`: the VM stops with an error that
names the oracle, the gfn and the trail of preemption points that led there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import VmBugged
from .host_region import is_zero_pfn
from .spte import MMU_PRESENT, is_leaf_present
from .tdp_iter import TdpIter
from .types import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, pages_per_level

if TYPE_CHECKING:
    from .memslots import Memslot
    from .mmu_page import MmuPage
    from .vm import Vm

__all__ = ["Sanitizers", "SanitizerViolation", "STALE_TRANSLATION", "NO_NEW_MAPPING",
           "STALE_GPC", "NO_LOST_DIRTY_PAGE", "INVALID_ROOT_MAPS_RANGE",
           "ROOT_FREED_WITH_SPTES"]

STALE_TRANSLATION = "stale-translation"
NO_NEW_MAPPING = "no-new-mapping-during-invalidation"
STALE_GPC = "stale-gpc"
NO_LOST_DIRTY_PAGE = "no-lost-dirty-page"
INVALID_ROOT_MAPS_RANGE = "invalid-root-maps-invalidated-range"
ROOT_FREED_WITH_SPTES = "root-freed-with-sptes"


class SanitizerViolation(VmBugged):
    def __init__(self, oracle: str, gfn: int, detail: str, trace: str) -> None:
        self.oracle, self.gfn, self.detail, self.trace = oracle, gfn, detail, trace
        super().__init__(f"sanitizer {oracle}: gfn {gfn:#x}: {detail}; "
                         f"preemption points: {trace or '(none)'}")


class Sanitizers:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.invalidating: list[tuple[int, int]] = []   # hva ranges begun, not ended
        self.invalidating_gfns: list[tuple[int, int, int]] = []   # (as_id, start, end)
        self.accesses_checked = 0
        self.mappings_checked = 0
        self.gpcs_checked = 0
        # Dirty-logged slot (as_id << 16 | id) -> offsets of the pages the guest wrote
        # since their dirtiness was last harvested.
        self.dirty_written: dict[int, set[int]] = {}
        self.dirty_pages_checked = 0

    # -- invalidation windows (called under mmu_lock held for write) -------------------

    def invalidation_begun(self, start: int, end: int) -> None:
        self.invalidating.append((start, end))

    def invalidation_ended(self, start: int, end: int) -> None:
        self.invalidating.remove((start, end))

    def _invalidating(self, hva_start: int, hva_end: int) -> bool:
        return any(s < hva_end and hva_start < e for s, e in self.invalidating)

    def gfn_invalidation_begun(self, hits: list[tuple[int, int, int]]) -> None:
        self.invalidating_gfns.extend(hits)

    def gfn_invalidation_ended(self, hits: list[tuple[int, int, int]]) -> None:
        for hit in hits:
            self.invalidating_gfns.remove(hit)

    def _invalidating_gfns(self, as_id: int, start: int, end: int) -> bool:
        return any(a == as_id and s < end and start < e
                   for a, s, e in self.invalidating_gfns)

    # -- the oracles -------------------------------------------------------------------

    def check_access(self, gfn: int, pfn: int, write: bool) -> None:
        """A vCPU completed an access to gfn through pfn."""
        self.accesses_checked += 1
        slot = self.vm.memslot_sets[0].lookup(gfn)
        if slot is None:
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x} but no "
                           "memslot maps the gfn")
        if self.invalidating_gfns and self._invalidating_gfns(0, gfn, gfn + 1):
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x} while the "
                           "gfn is being invalidated (memory attributes or guest_memfd)")
        attrs = self.vm.mem_attributes
        if attrs.starts and attrs.is_private(gfn):
            gmem = slot.gmem
            current = gmem.current_pfn(slot, gfn) if gmem is not None else None
            if current != pfn:
                held = "no page" if current is None else f"pfn {current:#x}"
                self.violation(STALE_TRANSLATION, gfn, f"private access through pfn "
                               f"{pfn:#x}, but the guest_memfd holds {held} for it")
            return
        hva = slot.gfn_to_hva(gfn)
        if self._invalidating(hva, hva + 1):
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x} while hva "
                           f"{hva:#x} is being invalidated")
        current = self.vm.host.current_pfn(hva)
        if current != pfn:
            host = "nothing" if current is None else f"pfn {current:#x}"
            self.violation(STALE_TRANSLATION, gfn, f"access through pfn {pfn:#x}, but the "
                           f"host maps {host} at hva {hva:#x}")
        if write and is_zero_pfn(pfn):
            self.violation(STALE_TRANSLATION, gfn, f"write through the zero page (pfn "
                           f"{pfn:#x}) at hva {hva:#x}: copy-on-write was not broken")
        if write and slot.dirty_logging:
            self.guest_wrote(slot, gfn)

    def check_new_mapping(self, as_id: int, gfn: int, level: int) -> None:
        """A leaf SPTE for [gfn, gfn + pages at level) was just made present."""
        self.mappings_checked += 1
        if self.invalidating_gfns and \
                self._invalidating_gfns(as_id, gfn, gfn + pages_per_level(level)):
            self.violation(NO_NEW_MAPPING, gfn, f"level-{level} leaf installed while the gfn "
                           "is being invalidated (memory attributes or guest_memfd)")
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

    def check_range_unmapped(self, as_id: int, start: int, end: int) -> None:
        """An MMU-notifier invalidation of gfns [start, end) has zapped and flushed: no
        invalid root of `as_id` maps any of them."""
        vm = self.vm
        if vm.tdp is None:
            return                  # the legacy MMU: obsolete pages are zapped whole
        with vm.rcu.read_lock():
            for root in vm.tdp.roots:
                if root.as_id != as_id or not root.invalid:
                    continue
                for it in TdpIter(root, start, end):
                    if is_leaf_present(it.old_spte, it.level):
                        self.violation(INVALID_ROOT_MAPS_RANGE, max(it.gfn, start),
                                       f"invalid {root!r} still maps it at level {it.level} "
                                       "after the invalidation's zap")

    def check_root_freed(self, root: "MmuPage") -> None:
        """The last reference to `root` is going: nothing may be mapped under it."""
        for i, spte in enumerate(root.spt):
            if spte & MMU_PRESENT:
                self.violation(ROOT_FREED_WITH_SPTES, root.gfn + (i << 9 * (root.level - 1)),
                               f"{root!r} is freed with entry {i} present ({spte:#x}): "
                               "what it maps would never be freed")

    # -- no lost dirty page (dirty_log.py) ---------------------------------------------

    def guest_wrote(self, slot: "Memslot", gfn: int) -> None:
        """A vCPU completed a guest write to gfn of `slot`."""
        written = self.dirty_written.get(slot.as_id << 16 | slot.id)
        if written is not None:
            written.add(gfn - slot.base_gfn)

    def dirty_log_watch(self, slot_key: int, on: bool) -> None:
        """Watch the slot from now on (enabling its log has returned: every SPTE is
        write-protected and TLBs flushed, or the bitmap is all ones), or stop (logging
        off, slot deleted)."""
        if on:
            self.dirty_written[slot_key] = set()
        else:
            self.dirty_written.pop(slot_key, None)

    def check_dirty_recorded(self, slot_key: int | None = None) -> None:
        """At a harvest: every page of the slot (None: of every watched slot) written
        since its dirtiness was last harvested is still recorded, by its bit in the
        slot's bitmap or by a dirty ring entry that no reset has recycled."""
        keys = list(self.dirty_written) if slot_key is None else [slot_key]
        in_rings = None
        for key in keys:
            written = self.dirty_written.get(key)
            if not written:
                continue
            if in_rings is None:
                in_rings = {(entry.slot, entry.offset) for vcpu in self.vm.vcpus()
                            if vcpu.dirty_ring is not None
                            for entry in vcpu.dirty_ring.outstanding()}
            slot = self.vm.memslot_sets[key >> 16].by_id.get(key & 0xFFFF)
            bitmap = slot.dirty_bitmap if slot is not None else None
            self.dirty_pages_checked += len(written)
            for offset in sorted(written):
                if bitmap is not None and bitmap[offset >> 6] >> (offset & 63) & 1:
                    continue
                if (key, offset) in in_rings:
                    continue
                self.violation(NO_LOST_DIRTY_PAGE, (slot.base_gfn if slot else 0) + offset,
                               f"the guest wrote page {offset} of slot {key >> 16}:"
                               f"{key & 0xFFFF} after its last harvest, and neither the "
                               "dirty bitmap nor a dirty ring records it")

    def dirty_pages_harvested(self, slot_key: int, offsets) -> None:
        """Userspace now holds these pages of the slot as dirty and copies them after
        this harvest returns: the writes made to them so far are accounted for."""
        written = self.dirty_written.get(slot_key)
        if written:
            written.difference_update(offsets)

    def violation(self, oracle: str, gfn: int, detail: str) -> None:
        raise SanitizerViolation(oracle, gfn, detail, self.vm.sched.describe_trace())
