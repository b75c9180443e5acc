"""The host's real KVM, driven through /dev/kvm: what `vmmu calibrate` measures and the
benchmarks hold vmmu to.

Standard library only (fcntl.ioctl, mmap, ctypes). Layers, each importing only those above:

    abi          ioctl numbers, constants and struct layouts of include/uapi/linux/kvm.h
    guest        64-bit CPL-3 guest code, identity map, GDT/TSS, segment and control registers
    stats        KVM_GET_STATS_FD: a VM's or vCPU's counters as {name: value}
    vm           RealVm: a VM, its memslots, one vCPU that writes pages; dirty-log ioctls
    workload     kvm_dirty_log_workload: the fast-page-fault seed's benchmark, ns per page
"""

from .vm import GuestExit, KvmUnavailable, RealVm, Slot, open_kvm
from .workload import PHASES, kvm_dirty_log_workload

__all__ = ["RealVm", "Slot", "KvmUnavailable", "GuestExit", "open_kvm",
           "kvm_dirty_log_workload", "PHASES"]
