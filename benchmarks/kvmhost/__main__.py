"""CLI: the dirty-logging workload on real KVM, one JSON line per result.

    python -m benchmarks.kvmhost [--size-mib 256] [--runs 5]
"""

from __future__ import annotations

import argparse

from benchmarks.report import emit
from vmmu.kvmhost.workload import MiB, PHASES, kvm_dirty_log_workload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kvmhost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    result = kvm_dirty_log_workload(args.size_mib * MiB, args.runs)
    common = {"runs": result["runs"], "size_mib": args.size_mib, "host": result["host"]}
    for phase in PHASES:
        extra = {"vcpu_stats": result["vcpu_stats"][phase]} if phase in result["vcpu_stats"] else {}
        emit(f"realkvm.{phase}", result["ns_per_page"][phase], "ns/page", None, None,
             digits=1, samples=[round(v, 1) for v in result["samples"][phase]],
             **extra, **common)


if __name__ == "__main__":
    main()
