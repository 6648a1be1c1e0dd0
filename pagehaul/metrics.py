"""Prometheus metrics for both sides, each in its own registry (no process-global state).

Receiver (``pagehaul receive --metrics-listen HOST:PORT``):

| metric | type | meaning |
|---|---|---|
| ``pagehaul_receiver_sessions_active`` | gauge | sessions open or waiting to be resumed |
| ``pagehaul_receiver_sessions_total{outcome}`` | counter | sessions ended: complete, refused, expired |
| ``pagehaul_receiver_pages_received_total{kind}`` | counter | pages: data, zero, parent |
| ``pagehaul_receiver_bytes_received_total`` | counter | payload bytes received (compressed, as on the wire) |
| ``pagehaul_receiver_rounds_committed_total`` | counter | rounds made durable |
| ``pagehaul_receiver_errors_total{code}`` | counter | sessions refused, by gRPC status |

Sender (``pagehaul send --metrics-listen HOST:PORT``, for scraping a long migration):

| metric | type | meaning |
|---|---|---|
| ``pagehaul_sender_pages_sent_total{kind}`` | counter | pages: data, zero, parent |
| ``pagehaul_sender_bytes_sent_total`` | counter | bytes put on the wire |
| ``pagehaul_sender_rounds_total`` | counter | rounds sent |
| ``pagehaul_sender_dirty_pages`` | gauge | dirty pages found for the current round |
| ``pagehaul_sender_frozen_seconds`` | gauge | frozen time of the final dump |
| ``pagehaul_sender_resumes_total`` | counter | sessions resumed after a lost connection |
| ``pagehaul_sender_errors_total{kind}`` | counter | failures by exception class |
| ``pagehaul_sender_phase{phase}`` | gauge | 1 for the phase the migration is in (``sender.phases``) |
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from pagehaul.errors import ConfigError

log = logging.getLogger(__name__)


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("pagehaul_receiver_sessions_active", "Sessions open or resumable", registry=r)
        self.sessions = Counter("pagehaul_receiver_sessions_total", "Sessions ended", ["outcome"], registry=r)
        self.pages = Counter("pagehaul_receiver_pages_received_total", "Pages received", ["kind"], registry=r)
        self.bytes = Counter("pagehaul_receiver_bytes_received_total", "Payload bytes received", registry=r)
        self.rounds = Counter("pagehaul_receiver_rounds_committed_total", "Rounds committed", registry=r)
        self.errors = Counter("pagehaul_receiver_errors_total", "Sessions refused", ["code"], registry=r)


class SenderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pages = Counter("pagehaul_sender_pages_sent_total", "Pages sent", ["kind"], registry=r)
        self.bytes = Counter("pagehaul_sender_bytes_sent_total", "Bytes put on the wire", registry=r)
        self.rounds = Counter("pagehaul_sender_rounds_total", "Rounds sent", registry=r)
        self.dirty = Gauge("pagehaul_sender_dirty_pages", "Dirty pages of the current round", registry=r)
        self.frozen = Gauge("pagehaul_sender_frozen_seconds", "Frozen time of the final dump", registry=r)
        self.resumes = Counter("pagehaul_sender_resumes_total", "Sessions resumed", registry=r)
        self.errors = Counter("pagehaul_sender_errors_total", "Failures", ["kind"], registry=r)
        self.phase = Gauge("pagehaul_sender_phase", "1 for the current phase of the migration", ["phase"], registry=r)


def serve_metrics(registry: CollectorRegistry, address: str) -> int:
    """Serve ``registry`` at http://ADDRESS/metrics in a daemon thread; returns the port."""
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot serve metrics on {address}: {err}") from err
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
    return bound
