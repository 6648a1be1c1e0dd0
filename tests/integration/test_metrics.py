"""Prometheus metrics on both sides, scraped over real HTTP from real processes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pagehaul.metrics import ReceiverMetrics, SenderMetrics, serve_metrics
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from sender.config import SendConfig
from sender.precopy import send
from tests.conftest import Workload


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_what_moved(tmp_path: Path, workload: Workload) -> None:
    rmetrics, smetrics = ReceiverMetrics(), SenderMetrics()
    rport = await asyncio.to_thread(serve_metrics, rmetrics.registry, "127.0.0.1:0")
    sport = await asyncio.to_thread(serve_metrics, smetrics.registry, "127.0.0.1:0")
    receiver = Receiver(ReceiverConfig(images_dir=tmp_path / "images", metrics=rmetrics))
    await receiver.start()
    try:
        result = await send(SendConfig(pid=workload.pid, target=receiver.address, metrics=smetrics))
    finally:
        await receiver.stop(0)
    r = await asyncio.to_thread(scrape, rport)
    s = await asyncio.to_thread(scrape, sport)
    written = sum(x.pages_written for x in result.rounds)
    assert s[("pagehaul_sender_pages_sent_total", (("kind", "data"),))] == written
    assert r[("pagehaul_receiver_pages_received_total", (("kind", "data"),))] == written
    assert s[("pagehaul_sender_rounds_total", ())] == len(result.rounds)
    assert r[("pagehaul_receiver_rounds_committed_total", ())] == len(result.rounds)
    assert r[("pagehaul_receiver_sessions_total", (("outcome", "complete"),))] == 1
    assert r[("pagehaul_receiver_sessions_active", ())] == 0
    assert s[("pagehaul_sender_bytes_sent_total", ())] == sum(x.wire_bytes for x in result.rounds)
    assert s[("pagehaul_sender_frozen_seconds", ())] == result.frozen_time_us / 1e6


def test_receive_cli_serves_metrics(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "receive", "--insecure", "--images-dir", str(tmp_path),
                             "--metrics-listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("pagehaul receiver listening on")
        metrics = scrape(port)
        assert metrics[("pagehaul_receiver_sessions_active", ())] == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
