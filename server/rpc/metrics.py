"""Prometheus metrics of a server: its RPCs as they end, its model as it is when scraped.

    vmmu_rpcs_total{method, code}                 RPCs ended, by method and status code
    vmmu_rpc_duration_seconds{method, code}       their latency (histogram)
    vmmu_limit_rejections_total{method}           RPCs refused RESOURCE_EXHAUSTED
    vmmu_vms, vmmu_vcpus                          what exists now
    vmmu_host_memory_bytes{state}                 host regions: "mapped", "populated"
                                                  (a KSM page once)
    vmmu_page_faults{kind}                        vCPU faults by outcome (pf_* stats)
    vmmu_exits{kind}                              vCPU exits: ept_violation, ept_misconfig, mmio
    vmmu_mmu_lock_wait_seconds{mode}              time tasks waited for mmu_lock, read/write
    vmmu_mmu_lock_contended{mode}                 acquisitions that had to wait
    vmmu_invalidations_held                       client-held invalidations now
    vmmu_trace_dropped_events                     events the open trace subscriptions dropped
    vmmu_event_loop_lag_seconds                   how late the loop ran a timer (histogram)
    vmmu_event_loop_busy_seconds                  the loop thread's CPU time between two
                                                  such timers (histogram)

The model's figures are sums over the VMs that exist when scraped (a destroyed VM's go
with it), read on the event loop's thread: `serve_metrics` answers HTTP on the server's
own loop, so a scrape never reads the model while a task changes it.

The event loop serves every call, so what holds it holds every caller up. A watch on the
loop (`LoopWatch`, while the endpoint serves) sets a timer every `WATCH_PERIOD_S` and
records how late it ran (the turns that held the loop then, and any wait of the loop's
thread for a CPU) and how much CPU the loop's thread used since the last one. A step of a
handler never spans two timers, so no single request held the loop for more CPU than the
largest busy interval: a busy interval under 50 ms means nobody waited 50 ms of work
behind any one request.

The endpoint is protected as the gRPC listener is: over HTTPS with the server's
certificate when the server has TLS (a client certificate required under mutual TLS), and
with tokens a scrape must carry `Authorization: Bearer <token>` of a known token (401
otherwise). `start_server` refuses a plaintext endpoint beyond the loopback unless
insecure, as it refuses such a gRPC listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc import StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vmmu.server.kvm import Kvm
from vmmu.server.rpc.auth import ServerTls, Tokens
from vmmu.server.rpc.handlers import SERVICE_PREFIX, Behavior, BehaviorInterceptor

__all__ = ["Metrics", "serve_metrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
FAULT_STATS = {"taken": "pf_taken", "fixed": "pf_fixed", "emulate": "pf_emulate",
               "spurious": "pf_spurious", "fast": "pf_fast", "retry": "pf_retry"}
EXIT_STATS = {"ept_violation": "ept_violations", "ept_misconfig": "ept_misconfigs",
              "mmio": "mmio_exits"}
REQUEST_TIMEOUT_S = 10.0      # a scraper has this long to send its request's head
WATCH_PERIOD_S = 0.005        # the loop watch's timer (200 a second: a few ms of CPU)
LOOP_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics(BehaviorInterceptor):
    """The registry of one server; as its first interceptor, it times every vmmu.v1 RPC
    (refusals by the interceptors after it included) and records how it ended."""

    def __init__(self, kvm: Kvm) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        self.rpcs = Counter("vmmu_rpcs", "RPCs ended, by method and status code",
                            ["method", "code"], registry=self.registry)
        self.latency = Histogram("vmmu_rpc_duration_seconds", "RPC latency",
                                 ["method", "code"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.rejections = Counter("vmmu_limit_rejections",
                                  "RPCs refused RESOURCE_EXHAUSTED (a limit)", ["method"],
                                  registry=self.registry)
        self.registry.register(_ModelCollector(kvm))
        self.loop_watch = LoopWatch(self.registry)

    def record(self, method: str, code: StatusCode, seconds: float) -> None:
        self.rpcs.labels(method, code.name).inc()
        self.latency.labels(method, code.name).observe(seconds)
        if code is StatusCode.RESOURCE_EXHAUSTED:
            self.rejections.labels(method).inc()

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        return _timed(behavior, self, method.removeprefix(SERVICE_PREFIX))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LoopWatch:
    """The event loop's lag and busy time, sampled by a timer every `WATCH_PERIOD_S`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram("vmmu_event_loop_lag_seconds",
                             "how late the event loop ran a timer: the turns that held it "
                             "then, and waits of its thread for a CPU",
                             buckets=LOOP_BUCKETS, registry=registry)
        self.busy = Histogram("vmmu_event_loop_busy_seconds",
                              f"the event loop thread's CPU time between two timers "
                              f"{WATCH_PERIOD_S * 1e3:g} ms apart: no request's step held "
                              "the loop longer", buckets=LOOP_BUCKETS, registry=registry)

    def start(self, endpoint: asyncio.Server) -> None:
        """Watch the running loop for as long as `endpoint` serves: a timer, not a task,
        so that nothing is left pending when the loop closes."""
        loop = asyncio.get_running_loop()
        self._arm(loop, endpoint, loop.time(), time.thread_time())

    def _arm(self, loop: asyncio.AbstractEventLoop, endpoint: asyncio.Server, now: float,
             cpu: float) -> None:
        due = now + WATCH_PERIOD_S
        loop.call_at(due, self._tick, loop, endpoint, due, cpu)

    def _tick(self, loop: asyncio.AbstractEventLoop, endpoint: asyncio.Server, due: float,
              cpu: float) -> None:
        now, now_cpu = loop.time(), time.thread_time()
        self.lag.observe(max(0.0, now - due))
        self.busy.observe(now_cpu - cpu)
        if endpoint.is_serving():
            self._arm(loop, endpoint, now, now_cpu)


def _ended(context: grpc.aio.ServicerContext, error: BaseException | None) -> StatusCode:
    """How a call ended: the code its handler or an abort set, else OK or, for an
    exception that set none, CANCELLED (the client went) or UNKNOWN."""
    code = context.code()
    if isinstance(code, StatusCode):
        return code
    if error is None:
        return StatusCode.OK
    return StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) \
        else StatusCode.UNKNOWN


def _timed(behavior: Callable[..., Any], metrics: Metrics, method: str) -> Callable[..., Any]:
    """`behavior` recording how and how fast each call ended."""
    @contextlib.contextmanager
    def recording(context: grpc.aio.ServicerContext) -> Iterator[None]:
        started, error = time.perf_counter(), None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            metrics.record(method, _ended(context, error), time.perf_counter() - started)

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with recording(context):
                async for response in behavior(request, context):
                    yield response
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with recording(context):
            return await behavior(request, context)
    return unary


class _ModelCollector:
    """The model's figures, summed over the VMs that exist at the scrape."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vms = self.kvm.vms()
        vcpus = [vcpu for vm in vms for vcpu in vm.vcpus()]
        vcpu_stats = [vcpu.stats() for vcpu in vcpus]
        locks = [vm.mmu_lock.statistics() for vm in vms]

        yield GaugeMetricFamily("vmmu_vms", "VMs", value=len(vms))
        yield GaugeMetricFamily("vmmu_vcpus", "vCPUs", value=len(vcpus))
        # The server's charges against its memory limits: kept as pages come and go, so a
        # scrape does not count the frames of every region (262,144 in 1 GiB of 4K).
        memory = GaugeMetricFamily("vmmu_host_memory_bytes",
                                   "host memory of the VMs' regions", labels=["state"])
        memory.add_metric(["mapped"], self.kvm.mapped.usage)
        memory.add_metric(["populated"], self.kvm.populated.usage)
        yield memory
        yield _by_kind("vmmu_page_faults", "vCPU page faults by outcome", FAULT_STATS,
                       vcpu_stats)
        yield _by_kind("vmmu_exits", "vCPU exits by reason", EXIT_STATS, vcpu_stats)
        wait = GaugeMetricFamily("vmmu_mmu_lock_wait_seconds",
                                 "time tasks waited for mmu_lock", labels=["mode"])
        contended = GaugeMetricFamily("vmmu_mmu_lock_contended",
                                      "mmu_lock acquisitions that waited", labels=["mode"])
        for mode in ("read", "write"):
            wait.add_metric([mode], sum(getattr(s, f"{mode}_wait_ns") for s in locks) / 1e9)
            contended.add_metric([mode], sum(getattr(s, f"{mode}_contended") for s in locks))
        yield wait
        yield contended
        yield GaugeMetricFamily("vmmu_invalidations_held", "client-held invalidations",
                                value=sum(len(vm.held_invalidations()) for vm in vms))
        yield GaugeMetricFamily("vmmu_trace_dropped_events",
                                "events the open trace subscriptions dropped",
                                value=sum(sub.dropped for sub in self.kvm.subscriptions()))


def _by_kind(name: str, documentation: str, kinds: dict[str, str],
             stats: list[dict[str, int]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["kind"])
    for kind, stat in kinds.items():
        family.add_metric([kind], sum(s[stat] for s in stats))
    return family


async def serve_metrics(address: str, metrics: Metrics, tls: ServerTls | None = None,
                        tokens: Tokens | None = None) -> asyncio.Server:
    """Answer `GET /metrics` (any path) over HTTP/1.0 on `address` ("host:port", port 0
    picks one), on the running loop; over HTTPS if `tls` is given; with `tokens`, only to
    a request whose `Authorization: Bearer` names one of them."""
    host, port = address.rsplit(":", 1)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = await reader.readuntil(b"\r\n\r\n")
            writer.write(_response(request, metrics, tokens))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass                        # a scraper that went away, was too slow, or junk
        finally:
            writer.close()

    endpoint = await asyncio.start_server(answer, host.strip("[]"), int(port),
                                          ssl=tls.ssl_context() if tls is not None else None)
    metrics.loop_watch.start(endpoint)
    return endpoint


def _response(request: bytes, metrics: Metrics, tokens: Tokens | None) -> bytes:
    """The whole HTTP response to `request` (its head)."""
    if not request.startswith(b"GET "):
        return _plain("405 Method Not Allowed", "only GET\n")
    if tokens is not None:
        headers = [line.decode("latin-1").partition(":")
                   for line in request.split(b"\r\n")[1:] if b":" in line]
        sent = [("authorization", value.strip()) for name, _, value in headers
                if name.strip().lower() == "authorization"]
        if tokens.identity(sent) is None:
            return _plain("401 Unauthorized", "a known token is required: send "
                          "'Authorization: Bearer <token>'\n",
                          'WWW-Authenticate: Bearer realm="vmmu"\r\n')
    body = metrics.exposition()
    return (f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _plain(status: str, text: str, headers: str = "") -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n{headers}"
            f"Content-Length: {len(text)}\r\n\r\n{text}").encode()
