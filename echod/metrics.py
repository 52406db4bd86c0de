"""Prometheus metrics over HTTP (``--metrics-listen HOST:PORT``), read when scraped.

Design
------
The hot path pays nothing for metrics: no counter is incremented per line
for them. :class:`EchodCollector` is a ``prometheus_client`` custom
collector: at each scrape it takes one :meth:`Registry.stats
<echod.registry.Registry.stats>` (which adds up the per-client counters the
handlers keep anyway, with those of clients gone) and turns it into metric
families. So one scrape is consistent with itself and costs one pass over
the connected clients.

The metrics, none with a per-client label:

- ``echod_connections_active`` (gauge), ``echod_connections_accepted_total``;
- ``echod_connections_refused_total{reason}``: ``server_full``,
  ``out_of_descriptors``, ``out_of_threads`` and the admission reasons
  (:data:`~echod.admission.REASONS`), each present from the start at 0;
- ``echod_connections_closed_total{reason}``: the reasons of the
  ``connection_closed`` event (:data:`CLOSE_REASONS`, always present, 0 until
  seen);
- ``echod_bytes_received_total``, ``echod_bytes_sent_total``,
  ``echod_lines_received_total``, ``echod_lines_sent_total``;
- ``echod_operator_messages_total``: lines pushed by ``/send`` and
  ``/broadcast``;
- ``echod_connection_duration_seconds`` (histogram of closed connections,
  buckets :data:`~echod.registry.DURATION_BUCKETS`);
- ``echod_max_clients`` (gauge, the setting in force: a reload changes it);
- ``echod_build_info{version}`` (always 1);
- the library's own ``process_*``, ``python_info`` and ``python_gc_*``.

Serving: :class:`MetricsServer` binds in its constructor (so a bad address
fails before echod detaches, as one sentence), serves from :meth:`start` in
its own threads (``wsgiref`` with a thread per request, the WSGI app of
``prometheus_client``), and :meth:`close` stops it. Any path answers with
the metrics (``/metrics`` is the usual one). It logs nothing per request.

Error handling: the constructor raises
:class:`~echod.errors.StartupError`; a failing scrape is the library's
HTTP 500, and echod serves on.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from echod import __version__, admission
from echod.config import Settings, split_host_port
from echod.errors import StartupError
from echod.registry import DURATION_BUCKETS, Registry
from echod.server import bind_error_message, resolve

CLOSE_REASONS = (
    "eof",
    "exit",
    "line_too_long",
    "idle_timeout",
    "line_timeout",
    "slow_reader",
    "reset",
    "kicked",
    "shutdown",
    "error",
)
REFUSE_REASONS = ("server_full", "out_of_descriptors", "out_of_threads", *admission.REASONS)


def _by_reason(name: str, doc: str, counts: dict[str, int], known: tuple[str, ...]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason in sorted({*known, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family


class EchodCollector(Collector):
    """echod's metrics, read from the registry at each scrape; see the module docstring."""

    def __init__(self, registry: Registry[Any], settings: Callable[[], Settings]) -> None:
        self.registry = registry
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        s = self.registry.stats()
        yield GaugeMetricFamily(
            "echod_connections_active", "Clients connected now.", value=s.connected
        )
        yield CounterMetricFamily(
            "echod_connections_accepted", "Clients accepted and served.", value=s.total_accepted
        )
        yield _by_reason(
            "echod_connections_refused", "Clients refused, by reason.", s.refused, REFUSE_REASONS
        )
        yield _by_reason(
            "echod_connections_closed",
            "Served clients that left, by the reason of their connection_closed event.",
            s.closed,
            CLOSE_REASONS,
        )
        for name, doc, value in (
            ("echod_bytes_received", "Bytes read from clients.", s.bytes_in),
            ("echod_bytes_sent", "Bytes written to clients.", s.bytes_out),
            ("echod_lines_received", "Complete lines read from clients.", s.lines_in),
            ("echod_lines_sent", "Lines written to clients.", s.lines_out),
            (
                "echod_operator_messages",
                "Lines pushed to clients by /send and /broadcast.",
                s.operator_messages,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), s.durations, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        yield HistogramMetricFamily(
            "echod_connection_duration_seconds",
            "How long closed connections lasted.",
            buckets=buckets,
            sum_value=s.duration_sum,
        )
        yield GaugeMetricFamily(
            "echod_max_clients", "The --max-clients in force.", value=self.settings().max_clients
        )
        info = GaugeMetricFamily(
            "echod_build_info", "echod's version; always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


class SandboxProcessCollector(ProcessCollector):
    """The library's process metrics, also where /proc/stat is hidden.

    The library reads the boot time from /proc/stat and, without it, reports
    no process metrics at all; the unit's ``ProcSubset=pid`` hides that file
    (found under a real systemd, tests/process/test_systemd_real.py). The
    boot time is then the wall clock minus ``CLOCK_BOOTTIME``, which is what
    /proc/stat's ``btime`` means.
    """

    def _boot_time(self) -> float:
        try:
            btime = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            btime = None
        if btime is None:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return float(btime)


def metrics_registry(
    registry: Registry[Any], settings: Callable[[], Settings]
) -> CollectorRegistry:
    """A prometheus_client registry of echod's metrics and the library's process metrics."""
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(EchodCollector(registry, settings))
    SandboxProcessCollector(registry=metrics)
    PlatformCollector(registry=metrics)
    GCCollector(registry=metrics)
    return metrics


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr would drown echod's own events


class _HTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper must not hold echod's exit
    allow_reuse_address = True

    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[Any, ...],
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a listening socket an upgrade handed over, served instead of binding."""
        self.address_family = family  # before TCPServer.__init__ makes the socket
        super().__init__(address, _Quiet, bind_and_activate=sock is None)
        if sock is not None:
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
            host, port = self.server_address[:2]
            self.server_name, self.server_port = str(host), int(port)
            self.setup_environ()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (getfqdn), which can
        # stall a start for seconds on a machine without a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    """The HTTP endpoint; bound by the constructor, served by :meth:`start`."""

    def __init__(
        self, listen: str, metrics: CollectorRegistry, sock: socket.socket | None = None
    ) -> None:
        host, port = split_host_port(listen)
        family, address = resolve(host, port)
        try:
            self._httpd = _HTTPServer(family, address, sock)
        except OSError as err:
            raise StartupError("--metrics-listen: " + bind_error_message(host, port, err)) from None
        self._httpd.set_app(make_wsgi_app(metrics))
        self._thread: threading.Thread | None = None

    @property
    def listening_socket(self) -> socket.socket:
        """The listening socket (an upgrade hands it over)."""
        return self._httpd.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="echod-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(1.0)
        self._httpd.server_close()
