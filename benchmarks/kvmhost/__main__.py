"""CLI: the dirty-logging workload on real KVM, one JSON line per result.

    python -m benchmarks.kvmhost [--size-mib 256] [--runs 5]
"""

from __future__ import annotations

import argparse
import json

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
        print(json.dumps({"benchmark": f"realkvm.{phase}",
                          "value": round(result["ns_per_page"][phase], 1), "unit": "ns/page",
                          "samples": [round(v, 1) for v in result["samples"][phase]],
                          **extra, **common}), flush=True)


if __name__ == "__main__":
    main()
