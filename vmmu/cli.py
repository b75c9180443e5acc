"""The `vmmu` command line: one function per subcommand, `main` dispatches.

    vmmu serve [--listen HOST:PORT] [--tls-cert F --tls-key F [--tls-client-ca F]]
               [--token-file F] [--insecure] [--keepalive SECONDS] [--metrics HOST:PORT]
               [--limits-file FILE] [--limit NAME=VALUE]...
                                       serve the vmmu.v1 gRPC API until SIGINT/SIGTERM
    vmmu demo [--accesses N] [--mmu tdp|legacy]
                                       an in-process server driven through the client
    vmmu explore SCENARIO --seeds N    run a race scenario under N schedule seeds
                [--workers K] [--ray [ADDRESS]]   on K processes, or as Ray tasks
    vmmu explore --all --seeds N       every scenario with and without each knob, a table
    vmmu scale [SWEEP ...] [--quick]   the seeds' sweeps in virtual time, as JSON lines
                [--workers K] [--ray [ADDRESS]]   on K processes, or as Ray tasks
    vmmu calibrate [--out FILE]        measure the cost table on the host's /dev/kvm

`vmmu scale` runs on uvloop when it is installed (`vmmu[fast]`), else on asyncio's default
loop; serve, demo and explore run on asyncio's unless asked for uvloop. `--event-loop`
(or VMMU_EVENT_LOOP) chooses (vmmu.event_loop; docs/benchmarks.md, "Event loop and
grpc.aio settings", says why).

A subcommand is a `_add_<name>(subparsers)` that declares its arguments and sets
`run=<function(args) -> exit status>` (and `check=<function(args)>` if it refuses some
combinations of options); `main` registers every one listed in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vmmu import event_loop
from vmmu.server.kvm.limits import Limits
from vmmu.server.kvm.vm import MMUS
from vmmu.server.rpc.app import DEFAULT_KEEPALIVE_S, start_server
from vmmu.server.rpc.auth import InsecureListener, ServerTls, Tokens

__all__ = ["main", "serve", "demo", "explore", "scale", "calibrate"]

DEFAULT_LISTEN = "127.0.0.1:50051"


def serve(args: argparse.Namespace) -> int:
    """Serve the vmmu.v1 gRPC API on `args.listen` until SIGINT or SIGTERM, then stop
    gracefully: open Run streams get a grace period, then the model shuts down. Errors
    are logged to stderr, one line each."""
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        print("vmmu: --tls-cert and --tls-key go together (and --tls-client-ca needs them)",
              file=sys.stderr)
        return 2
    try:
        limits = Limits.from_file(args.limits_file) if args.limits_file else Limits()
        limits = Limits.from_mapping(dict(args.limit), limits)
    except (OSError, ValueError) as exc:
        print(f"vmmu: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        tls = (ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
               if args.tls_cert else None)
        tokens = Tokens.from_file(args.token_file) if args.token_file else None
        event_loop.run(_serve(args.listen, limits, tls=tls, tokens=tokens,
                              insecure=args.insecure, keepalive_s=args.keepalive,
                              metrics=args.metrics))
    except (OSError, InsecureListener, ValueError) as exc:
        print(f"vmmu: {exc}", file=sys.stderr)
        return 1
    return 0


_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _limit(text: str) -> tuple[str, int]:
    """NAME=VALUE, VALUE an integer with an optional K, M, G or T (binary) suffix."""
    name, sep, value = text.partition("=")
    scale = _SIZE_SUFFIXES.get(value[-1:].upper(), 1) if value else 1
    digits = value[:-1] if scale > 1 else value
    if not sep or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (VALUE a number, "
                                         "optionally with K, M, G or T)")
    return name.strip(), int(digits) * scale


async def _serve(listen: str, limits: Limits, **options: Any) -> None:
    serving = await start_server(listen, limits, **options)
    # What start-up made (the modules, the server) lives as long as the process: frozen,
    # a full collection no longer scans it while every caller waits (a collection of
    # gen 2 held the loop for 27-42 ms under the load benchmark, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    host = listen.rsplit(":", 1)[0]
    print(f"vmmu serving on {host}:{serving.port}", flush=True)
    if serving.metrics is not None:
        metrics_host = options["metrics"].rsplit(":", 1)[0]
        scheme = "https" if options.get("tls") is not None else "http"
        print(f"vmmu metrics on {scheme}://{metrics_host}:{serving.metrics_port}/metrics",
              flush=True)
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
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate "
                        "chain (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="require 'authorization: Bearer <token>' with a token from FILE "
                             "(one 'TOKEN [NAME]' a line); each token is an identity that "
                             "sees only the VMs it created")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plaintext on a non-loopback address")
    parser.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE_S,
                        metavar="SECONDS",
                        help="close the connection of a client that answers no ping for "
                             "SECONDS, ending its streams and holds (pinged every SECONDS/2; "
                             f"default {DEFAULT_KEEPALIVE_S:g})")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP on HOST:PORT (HTTPS with "
                             "--tls-cert, a token needed with --token-file)")
    parser.add_argument("--limits-file", metavar="FILE",
                        help="a TOML file whose [limits] table sets limits (docs/limits.md)")
    parser.add_argument("--limit", type=_limit, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="set one limit, after the file (e.g. vms=16, "
                             "vm_populated_bytes=4G); repeatable")
    _add_event_loop(parser, "asyncio")
    parser.set_defaults(run=serve)


def demo(args: argparse.Namespace) -> int:
    """Run the demo: a VM with two memslots and two vCPUs, served and driven locally."""
    from vmmu.demo import run_demo
    return run_demo(args.accesses, args.mmu)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a demo VM against an in-process server",
                                   description=demo.__doc__)
    parser.add_argument("--accesses", type=int, default=200_000, metavar="N",
                        help="accesses per vCPU (default 200000)")
    parser.add_argument("--mmu", choices=MMUS, default="tdp",
                        help="the VM's MMU: the TDP MMU or the legacy (shadow) MMU with "
                             "rmaps (default tdp)")
    _add_event_loop(parser, "asyncio")
    parser.set_defaults(run=demo)


def scale(args: argparse.Namespace) -> int:
    """Run the seeds' sweeps on VMs in virtual time: one JSON line per result, the same
    for the same seed and cost table on any machine, and whatever the parallelism (the
    sweeps' configurations run on local worker processes or Ray tasks); exit 1 if a
    configuration's worker died again and again."""
    from vmmu.scale import SWEEPS, main as run_scale
    from vmmu.server.kvm.costs import load_cost_file
    unknown = [name for name in args.sweep if name not in SWEEPS]
    if unknown:
        print(f"vmmu scale: unknown sweeps {unknown}; known: {', '.join(SWEEPS)}",
              file=sys.stderr)
        return 2
    return _refusing("vmmu scale", lambda: run_scale(
        args.sweep or list(SWEEPS), quick=args.quick,
        costs=load_cost_file(args.costs) if args.costs else None, seed=args.seed,
        plot=args.plot, workers=_workers(args), ray=args.ray))


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
    _add_parallelism(parser, "configurations")
    _add_event_loop(parser, "auto")
    parser.set_defaults(run=scale)


def _add_parallelism(parser: argparse.ArgumentParser, units: str) -> None:
    from vmmu.server.pool import RAY_INSTALL
    parser.add_argument("--workers", type=int, metavar="K",
                        help="local worker processes, or the CPUs of the local Ray cluster "
                             "(default: this machine's cores)")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help=f"run the {units} as Ray tasks on the cluster at ADDRESS "
                             f"(HOST:PORT, ray://HOST:PORT or auto; a local cluster "
                             f"without it), waiting at most $VMMU_RAY_CONNECT_TIMEOUT "
                             f"seconds (default 15) for it to answer; needs Ray: "
                             f"{RAY_INSTALL}")


def _add_event_loop(parser: argparse.ArgumentParser, default: str) -> None:
    """--event-loop; without it $VMMU_EVENT_LOOP, else `default`: `auto` where uvloop was
    measured to help (the simulator), `asyncio` where it did not (the gRPC server)."""
    parser.add_argument("--event-loop", choices=event_loop.CHOICES, metavar="LOOP",
                        help="auto (uvloop when installed: vmmu[fast]), uvloop or asyncio "
                             f"(default: ${event_loop.ENV}, else {default})")
    parser.set_defaults(default_event_loop=default)


def _workers(args: argparse.Namespace) -> int:
    """--workers, else the machine's cores (a Ray cluster at an address has its own)."""
    from vmmu.server.pool import default_workers
    if args.workers is not None:
        return args.workers
    return 1 if args.ray else default_workers()


def _refusing(command: str, run: Callable[[], int]) -> int:
    """run(), or exit status 2 with the reason it was refused (1: a worker kept dying)."""
    from vmmu.server.kvm.errors import KvmError
    from vmmu.server.pool import RAY_INSTALL, RayMissing, WorkerDied
    try:
        return run()
    except RayMissing:
        print(f"{command}: --ray needs Ray, an optional extra: {RAY_INSTALL}",
              file=sys.stderr)
    except KvmError as refused:
        print(f"{command}: {refused.reason}", file=sys.stderr)
    except WorkerDied as died:
        print(f"{command}: {died}", file=sys.stderr)
        return 1
    return 2


def explore(args: argparse.Namespace) -> int:
    """Run a race scenario under many schedule seeds with the sanitizers on, on local
    worker processes or Ray tasks; exit 1 and print the lowest violating seed (oracle,
    trace) if a seed violates, else exit 0. With --all, every scenario with every
    protection on and with each knob off, as a table; exit 1 if a scenario violates with
    every protection on."""
    from vmmu.explore_cli import run_explore, run_explore_all
    if args.all:
        return _refusing("vmmu explore", lambda: run_explore_all(
            args.seeds, args.first_seed, _workers(args), args.ray))
    return _refusing("vmmu explore", lambda: run_explore(
        args.scenario, args.seeds, frozenset(args.knob), args.first_seed, _workers(args),
        args.ray))


def _add_explore(subparsers: argparse._SubParsersAction) -> None:
    from vmmu.server.kvm.explore import SCENARIOS
    from vmmu.server.kvm.vm import DEBUG_KNOBS
    parser = subparsers.add_parser("explore", help="explore a race scenario's schedules",
                                   description=explore.__doc__)
    parser.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS),
                        help="the scenario (or --all)")
    parser.add_argument("--all", action="store_true",
                        help="every scenario, with every protection on and each knob off")
    parser.add_argument("--seeds", type=int, default=500, help="seeds to try (default 500)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--knob", action="append", default=[], choices=sorted(DEBUG_KNOBS),
                        help="switch a protection off (repeatable)")
    _add_parallelism(parser, "seeds")
    _add_event_loop(parser, "asyncio")
    parser.set_defaults(run=explore, check=functools.partial(_check_explore, parser))


def _check_explore(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.all == (args.scenario is not None):
        parser.error("explore: give a scenario or --all")
    if args.all and args.knob:
        parser.error("explore: --all switches every knob off in turn; --knob is not for it")


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
    if "check" in args:
        args.check(args)
    if "default_event_loop" in args:
        try:
            event_loop.choose(args.event_loop or os.environ.get(event_loop.ENV)
                              or args.default_event_loop)
        except (event_loop.UvloopMissing, ValueError) as exc:
            print(f"vmmu: event loop: {exc}", file=sys.stderr)
            return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
