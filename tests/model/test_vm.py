"""The VM facade's small rules: configs, vCPU ids, host regions, introspection, lifecycle."""

from __future__ import annotations

import errno

import pytest

from vmmu.server.kvm import (AccessBatch, AccessKind, Backing, HostRegionInfo, Kvm,
                             KvmError, NoSuchObject, VmConfig, VmInfo)

MIB, GIB = 1 << 20, 1 << 30


@pytest.mark.parametrize("config", [VmConfig(max_vcpus=0), VmConfig(max_vcpus=1025),
                                    VmConfig(tdp_levels=3), VmConfig(tdp_levels=6)])
def test_bad_configs_are_einval(config):
    kvm = Kvm()
    with pytest.raises(KvmError) as err:
        kvm.create_vm(config)
    assert err.value.errno == errno.EINVAL and kvm.vms() == []


@pytest.mark.parametrize("levels, gpa_bits", [(4, 48), (5, 52)])
def test_gpa_width_follows_the_ept_levels(levels, gpa_bits):
    assert VmConfig(tdp_levels=levels).gpa_bits == gpa_bits


async def test_registry_hands_out_ids_and_forgets_destroyed_vms():
    kvm = Kvm()
    a, b = kvm.create_vm(VmConfig(name="a")), kvm.create_vm(VmConfig(name="b"))
    assert a.id != b.id and kvm.get_vm(b.id) is b
    await kvm.destroy_vm(a.id)
    assert kvm.vms() == [b]
    with pytest.raises(NoSuchObject) as err:
        kvm.get_vm(a.id)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(NoSuchObject):
        a.mmap(4096, Backing.PAGE_4K)
    await kvm.shutdown()
    assert kvm.vms() == []


def test_vcpu_ids(make_kvm_vm):
    vm = make_kvm_vm(max_vcpus=2)
    vm.create_vcpu(1)
    for bad, code in ((2, errno.EINVAL), (-1, errno.EINVAL), (1, errno.EEXIST)):
        with pytest.raises(KvmError) as err:
            vm.create_vcpu(bad)
        assert err.value.errno == code
    with pytest.raises(NoSuchObject):
        vm.vcpu(0)
    assert [v.id for v in vm.vcpus()] == [1] and vm.info().nr_vcpus == 1


async def test_host_regions(kvm_vm):
    small = kvm_vm.mmap(3 * 4096, Backing.PAGE_4K, writable=False)
    huge = kvm_vm.mmap(GIB, Backing.HUGETLB_1G)
    assert small == HostRegionInfo(small.hva, 3 * 4096, Backing.PAGE_4K, False, 0)
    assert huge.hva % GIB == 0
    assert kvm_vm.host_regions() == [small, huge]
    await kvm_vm.write_hva(huge.hva + 5, b"x")
    assert kvm_vm.host_regions()[1].populated_4k_pages == 1 << 18


@pytest.mark.parametrize("size, backing, hva, code", [
    (4096 + 1, Backing.PAGE_4K, None, errno.EINVAL),
    (0, Backing.PAGE_4K, None, errno.EINVAL),
    (2 * MIB, Backing.HUGETLB_1G, None, errno.EINVAL),       # hugetlb sizes are 1G multiples
    (GIB, Backing.HUGETLB_1G, 0x7E00_0020_0000, errno.EINVAL),
    (4096, Backing.PAGE_4K, 1 << 47, errno.ENOMEM),
])
def test_bad_mmaps(kvm_vm, size, backing, hva, code):
    with pytest.raises(KvmError) as err:
        kvm_vm.mmap(size, backing, hva=hva)
    assert err.value.errno == code and kvm_vm.host_regions() == []


def test_overlapping_mmap_is_eexist(kvm_vm):
    region = kvm_vm.mmap(2 * MIB, Backing.THP)
    with pytest.raises(KvmError) as err:
        kvm_vm.mmap(4096, Backing.PAGE_4K, hva=region.hva + MIB)
    assert err.value.errno == errno.EEXIST


async def test_munmap_takes_whole_regions_only(kvm_vm):
    region = kvm_vm.mmap(2 * MIB, Backing.PAGE_4K)
    with pytest.raises(NoSuchObject):
        await kvm_vm.munmap(region.hva, MIB)
    await kvm_vm.munmap(region.hva, region.size)
    assert kvm_vm.host_regions() == []


async def test_host_access_to_unmapped_or_read_only_memory_is_efault(kvm_vm):
    ro = kvm_vm.mmap(4096, Backing.PAGE_4K, writable=False)
    assert await kvm_vm.read_hva(ro.hva, 8) == bytes(8)
    with pytest.raises(KvmError) as err:
        await kvm_vm.write_hva(ro.hva, b"x")
    assert err.value.errno == errno.EFAULT
    for call in (lambda: kvm_vm.read_hva(0x1000, 1),
                 lambda: kvm_vm.read_hva(ro.hva + 4090, 8)):         # runs off the region
        with pytest.raises(KvmError) as err:
            await call()
        assert err.value.errno == errno.EFAULT


@pytest.mark.parametrize("gpa, as_id", [(1 << 48, 0), (0, 2), (-1, 0)])
def test_walk_rejects_what_no_root_can_hold(kvm_vm, gpa, as_id):
    with pytest.raises(KvmError) as err:
        kvm_vm.walk(gpa, as_id)
    assert err.value.errno == errno.EINVAL


async def test_info_counts_what_the_vm_holds(kvm_guest):
    vm = kvm_guest.vm
    vm.create_vcpu(3)
    assert vm.info() == VmInfo(vm.id, "model-test", vm.config, nr_vcpus=2, nr_memslots=1,
                               nr_host_regions=1, dead=False)


async def test_destroyed_vm_refuses_work(kvm_guest):
    vm, vcpu = kvm_guest.vm, kvm_guest.vcpu
    await vm.destroy()
    with pytest.raises(NoSuchObject):
        await vcpu.run(AccessBatch.build([(0, AccessKind.READ, 1, None)]))
    with pytest.raises(NoSuchObject):
        await vm.set_user_memory_region(1, 0, 8 * MIB, 4096, kvm_guest.region.hva)
    await vm.destroy()                                     # twice is fine
