"""(b) Round 0 over a 1 Gbit/s link: pagehaul vs CRIU 4.2 page server, sender and receiver in two namespaces.

The link: two network namespaces made for this run (``phb-snd-PID`` and ``phb-rcv-PID``), a veth
pair between them with addresses in a private /30 that exists only inside them, and on each
end ``tc qdisc add dev ... root tbf rate 1gbit burst 1mb latency 20ms`` (tbf's burst must hold at
least rate / HZ bytes: 500 KB at HZ=250). Nothing else is routed; the namespaces are deleted in
``finally`` (which removes the veth pair with them).

The sending side runs in the sender namespace through ``nsenter --net`` (the workload, ``pagehaul
send``, ``criu dump``): CRIU dumps a process in its own network and mount namespaces only, and
``ip netns exec`` would give each command a mount namespace of its own. The receivers (``pagehaul
receive``, ``criu page-server``) run with ``ip netns exec`` in the receiver namespace.

A raw TCP transfer (Python sockets, 256 MiB) over the same link shows what the link carries.
The same tools and columns as bench_round0 (CRIU's local dump is left out: it uses no link).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from rich.console import Console

from bench.bench_round0 import (
    COLUMNS,
    CRIU_PS,
    PAGEHAUL,
    PAGEHAUL_AUTO,
    PAGEHAUL_RAW,
    Net,
    Round0Bench,
    adaptive_note,
    result_rows,
    rss_ratio,
    summary,
    throughput_ratio,
    variant_options,
)
from bench.common import (
    MIB,
    BenchError,
    Child,
    QuietPolicy,
    base_parser,
    begin,
    in_netns,
    interleave,
    require_commands,
    require_criu,
    require_root,
    run,
    scratch_dir,
)

SENDER_ADDR: Final = "10.253.77.1"
RECEIVER_ADDR: Final = "10.253.77.2"
PREFIX_LEN: Final = 30
TARGET_RATIO: Final = 3.0
LINK_CHECK_BYTES: Final = 256 * MIB


@dataclass(frozen=True, slots=True)
class Link:
    sender_ns: str
    receiver_ns: str
    rate: str


def _ip(*argv: str) -> None:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


@contextlib.contextmanager
def shaped_link(rate: str, burst: str, latency: str) -> Iterator[Link]:
    """Two namespaces joined by a veth pair shaped with tbf on both ends; deleted afterwards."""
    tag = os.getpid() % 100000
    link = Link(f"phb-snd-{tag}", f"phb-rcv-{tag}", rate)
    snd_dev, rcv_dev = f"phbs{tag}", f"phbr{tag}"
    created: list[str] = []
    try:
        for ns in (link.sender_ns, link.receiver_ns):
            _ip("ip", "netns", "add", ns)
            created.append(ns)
        _ip("ip", "link", "add", snd_dev, "netns", link.sender_ns, "type", "veth",
            "peer", "name", rcv_dev, "netns", link.receiver_ns)
        for ns, dev, addr in ((link.sender_ns, snd_dev, SENDER_ADDR), (link.receiver_ns, rcv_dev, RECEIVER_ADDR)):
            _ip("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            _ip("ip", "-n", ns, "link", "set", dev, "up")
            _ip("ip", "-n", ns, "link", "set", "lo", "up")
            _ip("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", latency)
        yield link
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 22); n = 0; t0 = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += k
print(n, time.monotonic() - t0, flush=True)
"""

_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
block = bytes(range(256)) * (1 << 14)
left = int(sys.argv[3])
while left > 0:
    k = min(left, len(block)); c.sendall(block[:k]); left -= k
c.close()
"""


def link_check(link: Link, nbytes: int) -> float:
    """MiB/s of a raw TCP transfer over the link (receiver side clock, first byte to EOF)."""
    port = "27099"
    sink = Child(in_netns([sys.executable, "-c", _SINK, RECEIVER_ADDR, port], link.receiver_ns),
                 stdout=subprocess.PIPE)
    try:
        assert sink.proc.stdout is not None
        if sink.proc.stdout.readline().strip() != b"ready":
            raise BenchError("link check: the TCP sink did not start")
        source = Child(in_netns([sys.executable, "-c", _SOURCE, RECEIVER_ADDR, port, str(nbytes)],
                                link.sender_ns, "nsenter"))
        src = source.wait(300) or source.stop()
        if src.returncode != 0:
            raise BenchError(f"link check: TCP source exited {src.returncode}")
        got, seconds = sink.proc.stdout.readline().split()
        if int(got) != nbytes:
            raise BenchError(f"link check: sent {nbytes} bytes, {int(got)} arrived")
        return nbytes / MIB / float(seconds)
    finally:
        sink.stop()


def main(args: argparse.Namespace, console: Console) -> None:
    require_root()
    require_commands("ip", "tc", "nsenter")
    tools = require_criu()
    names = [PAGEHAUL, *([] if args.no_raw else [PAGEHAUL_RAW]), *([] if args.no_auto else [PAGEHAUL_AUTO]), CRIU_PS]
    spec, report = begin(args, console, f"(b) round 0 over a shaped {args.rate} link: pagehaul vs CRIU page server",
                         ", ".join(names))
    with shaped_link(args.rate, args.burst, args.latency) as link, scratch_dir(args, "shaped") as scratch:
        console.print(f"link: veth {link.sender_ns} {SENDER_ADDR} -> {link.receiver_ns} {RECEIVER_ADDR}, "
                      f"tbf rate {args.rate} burst {args.burst} latency {args.latency} on both ends")
        check = [link_check(link, LINK_CHECK_BYTES // (4 if args.quick else 1)) for _ in range(2)]
        console.print(f"raw TCP over the link: {max(check):.1f} MiB/s ({max(check) * MIB * 8 / 1e6:.0f} Mbit/s)")
        net = Net(label=f"{args.rate} veth", receiver_host=RECEIVER_ADDR, receiver_netns=link.receiver_ns,
                  sender_netns=link.sender_ns)
        bench = Round0Bench(tools, spec, scratch, net)
        try:
            results = interleave(names, args.reps, bench.run_one, QuietPolicy.from_args(args), console,
                                 summary=summary)
        finally:
            bench.close()
    report.table(f"round 0, {spec.describe()}, over veth shaped to {args.rate} (median (min-max) of {args.reps})",
                 COLUMNS, result_rows(results))
    report.note(f"Link: tbf {args.rate} (burst {args.burst}, latency {args.latency}) on both veth ends; raw TCP "
                f"carried {max(check):.1f} MiB/s. MiB/s (wall) is image MiB per second of the sending command; "
                "CRIU sends every page (zero pages too) uncompressed, pagehaul sends zero pages as holes and the "
                "rest zstd-compressed (level 1, or raw with --zstd-level off).")
    ratio = throughput_ratio(results, PAGEHAUL, CRIU_PS)
    report.ratio(f"shaped {args.rate} round 0, pagehaul / CRIU page-server (wall MiB/s)", ratio,
                 f">= {TARGET_RATIO:g}", None if ratio is None else ratio >= TARGET_RATIO,
                 "ratio of median throughputs")
    if PAGEHAUL_RAW in names:
        raw = throughput_ratio(results, PAGEHAUL_RAW, CRIU_PS)
        report.ratio(f"same with {PAGEHAUL_RAW}", raw, "(no target)", None, "zero pages skipped, no compression")
    if PAGEHAUL_AUTO in names:
        auto = throughput_ratio(results, PAGEHAUL_AUTO, CRIU_PS)
        report.ratio(f"same with {PAGEHAUL_AUTO}", auto, "(no target)", None, "adaptive level")
        adaptive_note(report, results)
    rss_ratio(report, results)
    report.finish(console)


def parser() -> argparse.ArgumentParser:
    p = base_parser("bench_shaped", __doc__.splitlines()[0], size_mib=True)
    p.add_argument("--rate", default="1gbit", help="tbf rate (default: 1gbit)")
    p.add_argument("--burst", default="1mb", help="tbf burst (default: 1mb)")
    p.add_argument("--latency", default="20ms", help="tbf latency (default: 20ms)")
    variant_options(p, tls=False)
    return p


if __name__ == "__main__":
    run(main, parser())
