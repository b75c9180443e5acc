"""The `vmmu` command line: one function per subcommand, `main` dispatches.

    vmmu serve [--listen HOST:PORT] [--tls-cert F --tls-key F [--tls-client-ca F]]
               [--token-file F] [--insecure] [--keepalive SECONDS] [--metrics HOST:PORT]
               [--limits-file FILE] [--limit NAME=VALUE]...
                                       serve the vmmu.v1 gRPC API until SIGINT/SIGTERM
    vmmu demo [--accesses N]           an in-process server driven through the client
    vmmu explore SCENARIO --seeds N    run a race scenario under N schedule seeds

A subcommand is a `_add_<name>(subparsers)` that declares its arguments and sets
`run=<function(args) -> exit status>`; `main` registers every one listed in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vmmu.server.kvm.limits import Limits
from vmmu.server.rpc.app import DEFAULT_KEEPALIVE_S, start_server
from vmmu.server.rpc.auth import InsecureListener, ServerTls, Tokens

__all__ = ["main", "serve", "demo", "explore"]

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
        asyncio.run(_serve(args.listen, limits, tls=tls, tokens=tokens,
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
    host = listen.rsplit(":", 1)[0]
    print(f"vmmu serving on {host}:{serving.port}", flush=True)
    if serving.metrics is not None:
        metrics_host = options["metrics"].rsplit(":", 1)[0]
        print(f"vmmu metrics on http://{metrics_host}:{serving.metrics_port}/metrics",
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
                        help="serve Prometheus metrics over HTTP on HOST:PORT")
    parser.add_argument("--limits-file", metavar="FILE",
                        help="a TOML file whose [limits] table sets limits (docs/limits.md)")
    parser.add_argument("--limit", type=_limit, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="set one limit, after the file (e.g. vms=16, "
                             "vm_populated_bytes=4G); repeatable")
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


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_serve, _add_demo, _add_explore)


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
