"""A harness that drives the host's real KVM through /dev/kvm, to hold vmmu's dirty logging to it.

Standard library only (fcntl.ioctl, mmap, ctypes). Layers, each importing only those above:

    abi          ioctl numbers, constants and struct layouts of include/uapi/linux/kvm.h
    guest        64-bit CPL-3 guest code, identity map, GDT/TSS, segment and control registers
    stats        KVM_GET_STATS_FD: a VM's or vCPU's counters as {name: value}
    vm           RealVm: a VM, its memslots, one vCPU that writes pages; dirty-log ioctls
    workload     kvm_dirty_log_workload: the fast-page-fault seed's benchmark, ns per page
    conformance  dirty-log scripts (GET / CLEAR / flags changes) and their errnos

    python -m benchmarks.kvmhost [--size-mib 256] [--runs 5]
"""

from .conformance import (BAD_ARGUMENTS, Clear, EnableManualProtect, Get, Result, SetRegion,
                          Step, Write, bad_argument_errnos, bitmap_of, pages_of,
                          real_dirty_bitmaps, run_script)
from .vm import GuestExit, KvmUnavailable, RealVm, Slot, open_kvm
from .workload import PHASES, kvm_dirty_log_workload

__all__ = ["RealVm", "Slot", "KvmUnavailable", "GuestExit", "open_kvm",
           "kvm_dirty_log_workload", "PHASES",
           "run_script", "real_dirty_bitmaps", "bad_argument_errnos", "BAD_ARGUMENTS",
           "EnableManualProtect", "SetRegion", "Write", "Get", "Clear", "Step", "Result",
           "bitmap_of", "pages_of"]
