"""The `vmmu` command line: one function per subcommand, `main` dispatches.

    vmmu serve [--listen HOST:PORT]    serve the vmmu.v1 gRPC API until SIGINT/SIGTERM
    vmmu demo [--accesses N]           an in-process server driven through the client
    vmmu explore SCENARIO --seeds N    run a race scenario under N schedule seeds
    vmmu scale [SWEEP ...] [--quick]   the seeds' sweeps in virtual time, as JSON lines
    vmmu calibrate [--out FILE]        measure the cost table on the host's /dev/kvm

A subcommand is a `_add_<name>(subparsers)` that declares its arguments and sets
`run=<function(args) -> exit status>`; `main` registers every one listed in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Sequence

from vmmu.server.rpc.app import start_server

__all__ = ["main", "serve", "demo", "explore", "scale", "calibrate"]

DEFAULT_LISTEN = "127.0.0.1:50051"


def serve(args: argparse.Namespace) -> int:
    """Serve the vmmu.v1 gRPC API on `args.listen` until SIGINT or SIGTERM, then stop
    gracefully: open Run streams get a grace period, then the model shuts down."""
    try:
        asyncio.run(_serve(args.listen))
    except OSError as exc:
        print(f"vmmu: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(listen: str) -> None:
    serving = await start_server(listen)
    host = listen.rsplit(":", 1)[0]
    print(f"vmmu serving on {host}:{serving.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print("vmmu stopping", flush=True)
    await serving.stop()


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the vmmu.v1 gRPC API",
        description="Serve the vmmu.v1 gRPC API (with reflection and health) until SIGINT "
                    "or SIGTERM, then stop gracefully.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks "
                             "a free port)")
    parser.set_defaults(run=serve)


def demo(args: argparse.Namespace) -> int:
    """Run the demo: a VM with two memslots and two vCPUs, served and driven locally."""
    from vmmu.demo import run_demo
    return run_demo(args.accesses)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a demo VM against an in-process server",
                                   description=demo.__doc__)
    parser.add_argument("--accesses", type=int, default=200_000, metavar="N",
                        help="accesses per vCPU (default 200000)")
    parser.set_defaults(run=demo)


def scale(args: argparse.Namespace) -> int:
    """Run the seeds' sweeps on VMs in virtual time: one JSON line per result, the same
    for the same seed and cost table on any machine."""
    from vmmu.scale import SWEEPS, main as run_scale
    from vmmu.server.kvm.costs import load_cost_file
    unknown = [name for name in args.sweep if name not in SWEEPS]
    if unknown:
        print(f"vmmu scale: unknown sweeps {unknown}; known: {', '.join(SWEEPS)}",
              file=sys.stderr)
        return 2
    costs = load_cost_file(args.costs) if args.costs else None
    return run_scale(args.sweep or list(SWEEPS), quick=args.quick, costs=costs,
                     seed=args.seed, plot=args.plot)


def _add_scale(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scale", help="the seeds' sweeps in virtual time",
                                   description=scale.__doc__)
    parser.add_argument("sweep", nargs="*", help="seed002 seed003 seed000 seed001 seed004 "
                        "(default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds to run")
    parser.add_argument("--seed", type=int, default=0, help="breaks the clock's ties")
    parser.add_argument("--costs", metavar="FILE", help="a cost file (vmmu calibrate)")
    parser.add_argument("--plot", metavar="DIR", help="also write PNG charts there "
                        "(needs vmmu[plot])")
    parser.set_defaults(run=scale)


def explore(args: argparse.Namespace) -> int:
    """Run a race scenario under many schedule seeds with the sanitizers on; exit 1 and
    print the first violation (seed, oracle, trace) if a seed violates, else exit 0."""
    from vmmu.explore_cli import run_explore
    return run_explore(args.scenario, args.seeds, frozenset(args.knob), args.first_seed)


def _add_explore(subparsers: argparse._SubParsersAction) -> None:
    from vmmu.server.kvm.explore import SCENARIOS
    from vmmu.server.kvm.vm import DEBUG_KNOBS
    parser = subparsers.add_parser("explore", help="explore a race scenario's schedules",
                                   description=explore.__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=500, help="seeds to try (default 500)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--knob", action="append", default=[], choices=sorted(DEBUG_KNOBS),
                        help="switch a protection off (repeatable)")
    parser.set_defaults(run=explore)


def calibrate(args: argparse.Namespace) -> int:
    """Measure on the host's /dev/kvm an exit round trip, a demand fault, a write-protect
    fault and GET_DIRTY_LOG per page, and write the cost file of a VM in virtual time
    (`create_vm(clock="virtual", costs=load_cost_file(FILE))`); exit 1 without a usable
    /dev/kvm."""
    from vmmu.calibrate import calibrate as measure_costs, dumps
    from vmmu.kvmhost import GuestExit, KvmUnavailable
    try:
        cost_file = measure_costs(args.size_mib << 20, args.runs)
    except KvmUnavailable as exc:
        print(f"vmmu calibrate: no KVM to measure: {exc}", file=sys.stderr)
        return 1
    except (GuestExit, OSError) as exc:
        print(f"vmmu calibrate: measuring on /dev/kvm failed: {exc}", file=sys.stderr)
        return 1
    text = dumps(cost_file)
    if args.out is None:
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"vmmu calibrate: wrote {args.out}", file=sys.stderr)
    return 0


def _add_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="measure the cost table on /dev/kvm",
                                   description=calibrate.__doc__)
    parser.add_argument("--out", metavar="FILE", help="write the cost file here "
                        "(default: standard output)")
    parser.add_argument("--size-mib", type=int, default=64, metavar="N",
                        help="MiB of guest memory each fault measurement writes (default 64)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="runs of each measurement, the median kept (default 3)")
    parser.set_defaults(run=calibrate)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_serve, _add_demo, _add_explore, _add_scale, _add_calibrate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmmu", description="An executable model of the Linux KVM x86 TDP MMU.")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
