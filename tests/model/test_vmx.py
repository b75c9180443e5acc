"""EPT violations and misconfigurations become #PF error codes as VMX does (reference §2.2)."""

from __future__ import annotations

import pytest

from vmmu.server.kvm import (KVM_MEM_READONLY, AccessBatch, AccessKind, Backing, ExitReason)
from vmmu.server.kvm import vcpu as vcpu_module
from vmmu.server.kvm.mmu_internal import (PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK,
                                          PFERR_GUEST_PAGE_MASK, PFERR_PRESENT_MASK,
                                          PFERR_RSVD_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK)
from vmmu.server.kvm.vmx import (EPT_VIOLATION_ACC_INSTR, EPT_VIOLATION_ACC_READ,
                                 EPT_VIOLATION_ACC_WRITE, EPT_VIOLATION_GVA_IS_VALID,
                                 EPT_VIOLATION_GVA_TRANSLATED, error_code_from_qualification,
                                 ept_violation_qualification)

MIB = 1 << 20
VALID = EPT_VIOLATION_GVA_IS_VALID
TRANSLATED = EPT_VIOLATION_GVA_TRANSLATED


@pytest.mark.parametrize("qualification, error_code", [
    (EPT_VIOLATION_ACC_READ, PFERR_USER_MASK),
    (EPT_VIOLATION_ACC_WRITE, PFERR_WRITE_MASK),
    (EPT_VIOLATION_ACC_INSTR, PFERR_FETCH_MASK),
    (EPT_VIOLATION_ACC_WRITE | 1 << 3, PFERR_WRITE_MASK | PFERR_PRESENT_MASK),   # R allowed
    (EPT_VIOLATION_ACC_READ | 1 << 4, PFERR_USER_MASK | PFERR_PRESENT_MASK),     # W allowed
    (EPT_VIOLATION_ACC_INSTR | 1 << 5, PFERR_FETCH_MASK | PFERR_PRESENT_MASK),   # X allowed
    (EPT_VIOLATION_ACC_READ | VALID | TRANSLATED, PFERR_USER_MASK | PFERR_GUEST_FINAL_MASK),
    (EPT_VIOLATION_ACC_READ | VALID, PFERR_USER_MASK | PFERR_GUEST_PAGE_MASK),
    (EPT_VIOLATION_ACC_READ | TRANSLATED, PFERR_USER_MASK),     # bit 8 means nothing alone
])
def test_error_code_from_qualification(qualification, error_code):
    assert error_code_from_qualification(qualification) == error_code


@pytest.mark.parametrize("kind, access_bit", [(AccessKind.READ, EPT_VIOLATION_ACC_READ),
                                              (AccessKind.WRITE, EPT_VIOLATION_ACC_WRITE),
                                              (AccessKind.EXEC, EPT_VIOLATION_ACC_INSTR)])
@pytest.mark.parametrize("walk_rwx", range(8))
def test_qualification_of_a_guest_access(kind, access_bit, walk_rwx):
    q = ept_violation_qualification(kind, walk_rwx)
    assert q == access_bit | walk_rwx << 3 | VALID | TRANSLATED
    code = error_code_from_qualification(q)
    assert bool(code & PFERR_PRESENT_MASK) == bool(walk_rwx)
    assert code & PFERR_GUEST_FINAL_MASK and not code & PFERR_GUEST_PAGE_MASK


@pytest.fixture
def error_codes(monkeypatch):
    """The error code of every fault the vCPUs hand to the MMU, in order."""
    log = []
    real = vcpu_module.page_fault

    async def recording(vcpu, gpa, error_code):
        log.append((gpa, error_code))
        return await real(vcpu, gpa, error_code)

    monkeypatch.setattr(vcpu_module, "page_fault", recording)
    return log


def run(vcpu, *accesses):
    return vcpu.run(AccessBatch.build(accesses))


async def test_not_present_then_protection_fault_on_a_read_only_host_page(make_guest,
                                                                          error_codes):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, writable=False)
    assert (await run(g.vcpu, (0x1000, AccessKind.READ, 4, None))).exit.reason is \
        ExitReason.DONE
    leaf = g.vm.walk(0x1000)[-1]
    assert leaf.kind == "leaf" and leaf.readable and not leaf.writable
    result = await run(g.vcpu, (0x1000, AccessKind.WRITE, 4, None))
    assert result.exit.reason is ExitReason.MEMORY_FAULT
    assert error_codes == [
        (0x1000, PFERR_USER_MASK | PFERR_GUEST_FINAL_MASK),                      # not present
        (0x1000, PFERR_WRITE_MASK | PFERR_PRESENT_MASK | PFERR_GUEST_FINAL_MASK),  # R-X leaf
    ]
    assert g.vcpu.stats()["ept_violations"] == 2


async def test_write_to_a_read_only_slot_is_a_present_write_fault(make_guest, error_codes):
    g = await make_guest(Backing.PAGE_4K, 2 * MIB, flags=KVM_MEM_READONLY)
    await run(g.vcpu, (0x2000, AccessKind.READ, 4, None))
    result = await run(g.vcpu, (0x2000, AccessKind.WRITE, 4, b"nope"))
    assert result.exit.reason is ExitReason.MMIO
    assert error_codes[-1] == (0x2000, PFERR_WRITE_MASK | PFERR_PRESENT_MASK |
                               PFERR_GUEST_FINAL_MASK)


async def test_mmio_spte_hit_is_a_misconfiguration_with_rsvd(kvm_guest, error_codes):
    vcpu = kvm_guest.vcpu
    for _ in range(2):
        result = await run(vcpu, (0x4000_0000, AccessKind.READ, 4, None))
        assert result.exit.reason is ExitReason.MMIO
        await vcpu.run(mmio_data=b"\0" * 4)
    assert [code for _, code in error_codes] == [PFERR_USER_MASK | PFERR_GUEST_FINAL_MASK,
                                                 PFERR_RSVD_MASK]
    assert vcpu.stats()["ept_misconfigs"] == 1
