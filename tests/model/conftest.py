"""Fixtures of the model's unit tests: a fresh VM, and a VM with one backed slot and a vCPU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vmmu.server.kvm import Backing, HostRegionInfo, Kvm, Vcpu, Vm, VmConfig

MIB = 1 << 20
GIB = 1 << 30


@dataclass
class Guest:
    """A VM whose slot 0 maps `size` bytes at gpa `gpa` onto `region`, with vCPU 0."""

    vm: Vm
    vcpu: Vcpu
    region: HostRegionInfo
    gpa: int
    size: int

    def hva(self, gpa: int) -> int:
        return self.region.hva + (gpa - self.gpa)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "tdp_only: the test reads the TDP MMU's own structures "
                            "or behaviour the legacy MMU does not share (docs/legacy-mmu.md)")


@pytest.fixture(params=["tdp", "legacy"])
def mmu(request) -> str:
    """The MMU the model's VMs run (VmConfig.mmu): each test runs on both, unless it
    reads one MMU's structures (`@pytest.mark.tdp_only`)."""
    if request.param != "tdp" and request.node.get_closest_marker("tdp_only"):
        pytest.skip("reads the TDP MMU's own structures")
    return request.param


@pytest.fixture
def make_kvm_vm(mmu):
    """`make_kvm_vm(**VmConfig fields)`: a fresh VM, on the `mmu` of the test's run."""
    kvm = Kvm()

    def make(**config) -> Vm:
        config.setdefault("mmu", mmu)
        return kvm.create_vm(VmConfig(name="model-test", **config))

    return make


@pytest.fixture
def kvm_vm(make_kvm_vm) -> Vm:
    return make_kvm_vm()


@pytest.fixture
def make_guest(make_kvm_vm):
    """`await make_guest(backing, size, gpa=0, flags=0, **VmConfig fields)`."""

    async def make(backing: Backing = Backing.PAGE_4K, size: int = 4 * MIB, gpa: int = 0,
                   flags: int = 0, writable: bool = True, **config) -> Guest:
        vm = make_kvm_vm(**config)
        region = vm.mmap(size, backing, writable=writable)
        await vm.set_user_memory_region(0, flags, gpa, size, region.hva)
        return Guest(vm, vm.create_vcpu(0), region, gpa, size)

    return make


@pytest.fixture
async def kvm_guest(make_guest) -> Guest:
    """4 MiB of THP-backed memory at gpa 0 in a 4-level VM with A/D bits."""
    return await make_guest(Backing.THP, 4 * MIB)
