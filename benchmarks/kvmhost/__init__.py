"""A harness that drives the host's real KVM through /dev/kvm, to hold vmmu's dirty logging to it.

The VM, its guest and the ioctls live in `vmmu.kvmhost` (abi, guest, stats, vm, workload),
which `vmmu calibrate` uses too; here, on top of them:

    conformance  dirty-log scripts (GET / CLEAR / flags changes) and their errnos

    python -m benchmarks.kvmhost [--size-mib 256] [--runs 5]
"""

from .conformance import (BAD_ARGUMENTS, Clear, EnableManualProtect, Get, Result, SetRegion,
                          Step, Write, bad_argument_errnos, bitmap_of, pages_of,
                          real_dirty_bitmaps, run_script)
from vmmu.kvmhost.vm import GuestExit, KvmUnavailable, RealVm, Slot, open_kvm
from vmmu.kvmhost.workload import PHASES, kvm_dirty_log_workload

__all__ = ["RealVm", "Slot", "KvmUnavailable", "GuestExit", "open_kvm",
           "kvm_dirty_log_workload", "PHASES",
           "run_script", "real_dirty_bitmaps", "bad_argument_errnos", "BAD_ARGUMENTS",
           "EnableManualProtect", "SetRegion", "Write", "Get", "Clear", "Step", "Result",
           "bitmap_of", "pages_of"]
