"""The `vmmu` command line: one function per subcommand, `main` dispatches.

    vmmu serve [--listen HOST:PORT]    serve the vmmu.v1 gRPC API until SIGINT/SIGTERM
    vmmu demo [--accesses N]           an in-process server driven through the client
    vmmu explore SCENARIO --seeds N    run a race scenario under N schedule seeds
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

__all__ = ["main", "serve", "demo", "explore", "calibrate"]

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
    _add_serve, _add_demo, _add_explore, _add_calibrate)


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
