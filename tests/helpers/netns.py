"""Hosts on one machine: network namespaces joined by a veth pair, or on one bridge.

``two_hosts()`` creates namespaces ``phA-PID-N`` and ``phB-PID-N`` (unique per test process and
call), a veth pair ``phaPIDN``/``phbPIDN`` between them with 10.231.N.1/30 (A) and 10.231.N.2/30
(B), and ``lo`` up in both. Only these two namespaces see the addresses, so nothing leaves the
machine or touches the host's own network. However the ``with`` block ends, the namespaces are
deleted, and any process still inside them (the test started it; a failed test may not have
reaped it) is killed by pid first, so that deleting a namespace really frees it.

``ip netns exec NS cmd`` changes only the network namespace (and mounts a fresh /sys): pids,
/proc and ptrace are the host's, so a sender inside A can migrate a process of the root namespace.

Everything goes through ``ip``/``tc``/``ss`` from iproute2; the link is taken down and up from
outside (``ip -n NS link set DEV down``).

``one_lan()`` puts hosts A, B and C on one Ethernet segment: a bridge in a fourth namespace (the
switch, ``phS-PID-N``) with one veth port per host; each host (``phA``/``phB``/``phC-PID-N``)
has the other end as ``lan0`` with 10.232.N.1, .2 and .3/24, and A also has the service address
10.232.N.100/24 (a secondary address, as a service's own address usually is). Commands enter a
host with ``nsenter --net`` only, so that CRIU sees one mount namespace on both sides.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import pytest

Side = Literal["a", "b"]

_counter = itertools.count(1)
CMD_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 10.0


def in_ci() -> bool:
    """As tests/conftest.py: CI must not skip (imported lazily there would create a cycle)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=check)


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"phprobe-{os.getpid()}-{next(_counter)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def require_netns() -> None:
    """Skip with the reason when namespaces are unavailable; under CI that is a failure."""
    reason = unavailable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI must not skip the two-host tests: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class TwoHosts:
    """Namespace A (``ns_a``, ``dev_a``, ``addr_a``) linked to B (``ns_b``, ``dev_b``, ``addr_b``)."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    def _ns_dev(self, side: Side) -> tuple[str, str]:
        return (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)

    def ns(self, side: Side) -> str:
        return self._ns_dev(side)[0]

    @staticmethod
    def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, side: Side, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside namespace ``side`` (the pid is the command's: ip execs it)."""
        return subprocess.Popen(self.exec_argv(self.ns(side), argv), text=True, **kwargs)

    def run(self, side: Side, argv: Sequence[str], timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_argv(self.ns(side), argv), capture_output=True, text=True,
                              timeout=timeout, check=True)

    def set_link(self, up: bool, side: Side | Literal["both"] = "both") -> None:
        """Take the link down or up. One end down: the host on the other end loses carrier and sees
        only silence (packets dropped, no reset, no error), the host on the downed end gets "network
        unreachable" on its sockets. Both ends (the default): both get that error."""
        for s in ("a", "b") if side == "both" else (side,):
            ns, dev = self._ns_dev(s)
            _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def link_is_up(self, side: Side = "a") -> bool:
        ns, dev = self._ns_dev(side)
        flags = json.loads(_ip("-n", ns, "-j", "link", "show", dev).stdout)[0]["flags"]
        return "UP" in flags and "LOWER_UP" in flags

    def rx_bytes(self, side: Side) -> int:
        """Bytes this side's veth end has received (its kernel counter)."""
        ns, dev = self._ns_dev(side)
        stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", dev).stdout)
        return int(stats[0]["stats64"]["rx"]["bytes"])

    def established(self, side: Side, peer: str) -> set[str]:
        """Local ``ADDR:PORT`` of this side's established TCP connections to ``peer`` (an address)."""
        out = self.run(side, ["ss", "-Htn", "state", "established", "dst", peer]).stdout
        return {line.split()[2] for line in out.splitlines() if line.strip()}

    def shape(self, rate: str, side: Side = "a", burst: str = "256kb", latency: str = "50ms") -> None:
        """A token bucket (``tc qdisc … tbf``) on this side's egress, e.g. ``rate="200mbit"``."""
        ns, dev = self._ns_dev(side)
        subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", burst, "latency", latency], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT_S, check=True)

    def unshape(self, side: Side = "a") -> None:
        ns, dev = self._ns_dev(side)
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT_S, check=False)


def _pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process left in ``ns`` (ours: nothing else enters a namespace we named) and
    wait, bounded, until none is left."""
    for pid in _pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while _pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.02)  # bounded poll for the kernel to finish the kills


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Two namespaces and a veth pair; always removed, even when creating them fails halfway."""
    n = next(_counter)
    pid = os.getpid()
    subnet = (pid + n) % 250 + 1  # addresses live only inside our namespaces; variety helps reading logs
    hosts = TwoHosts(ns_a=f"phA-{pid}-{n}", ns_b=f"phB-{pid}-{n}", dev_a=f"pha{pid}{n}"[:15],
                     dev_b=f"phb{pid}{n}"[:15], addr_a=f"10.231.{subnet}.1", addr_b=f"10.231.{subnet}.2")
    made: list[str] = []
    try:
        for ns in (hosts.ns_a, hosts.ns_b):
            _ip("netns", "add", ns)
            made.append(ns)
        # Created directly inside the namespaces: no moment in the root namespace.
        _ip("link", "add", hosts.dev_a, "netns", hosts.ns_a, "type", "veth",
            "peer", "name", hosts.dev_b, "netns", hosts.ns_b)
        for ns, dev, addr in ((hosts.ns_a, hosts.dev_a, hosts.addr_a), (hosts.ns_b, hosts.dev_b, hosts.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield hosts
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{' '.join(err.cmd)} failed: {err.stderr.strip()}") from err
    finally:
        for ns in made:
            _kill_inside(ns)
        for ns in made:  # deleting A's namespace destroys the veth pair with it
            _ip("netns", "del", ns, check=False)


LanHost = Literal["a", "b", "c"]
LAN_DEV = "lan0"
SERVICE_HOST = 100  # the service address is .100 of the hosts' /24


@dataclass(frozen=True, slots=True)
class Lan:
    """Hosts A, B and C on one bridge (module doc); ``service`` is the address that moves."""

    ns_a: str
    ns_b: str
    ns_c: str
    ns_switch: str
    subnet: str  # "10.232.N"
    prefixlen: int = 24
    dev: str = LAN_DEV

    def ns(self, host: LanHost) -> str:
        return {"a": self.ns_a, "b": self.ns_b, "c": self.ns_c}[host]

    def addr(self, host: LanHost) -> str:
        return f"{self.subnet}.{' abc'.index(host)}"

    @property
    def service(self) -> str:
        return f"{self.subnet}.{SERVICE_HOST}"

    @property
    def service_cidr(self) -> str:
        return f"{self.service}/{self.prefixlen}"

    def argv(self, host: LanHost, argv: Sequence[str]) -> list[str]:
        """``argv`` in the network namespace of ``host`` only (mounts, pids: the machine's)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}", *argv]

    def run(self, host: LanHost, argv: Sequence[str]) -> str:
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                              check=True).stdout

    def addresses(self, host: LanHost) -> set[str]:
        """``ADDR/PREFIXLEN`` of every IPv4 address on the host's ``lan0``."""
        links = json.loads(_ip("-n", self.ns(host), "-j", "-4", "addr", "show", "dev", self.dev).stdout)
        return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", [])}

    def mac(self, host: LanHost) -> str:
        return str(json.loads(_ip("-n", self.ns(host), "-j", "link", "show", self.dev).stdout)[0]["address"])

    def neighbour(self, host: LanHost, addr: str) -> str | None:
        """The MAC ``host``'s neighbour table has for ``addr`` (None: no entry, or no MAC in it)."""
        entries = json.loads(_ip("-n", self.ns(host), "-j", "neigh", "show", addr, "dev", self.dev).stdout)
        return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None

    def connections(self, host: LanHost, local: str) -> set[str]:
        """Peers (``ADDR:PORT``) of ``host``'s established TCP connections from ``local`` (``ADDR:PORT``)."""
        out = self.run(host, ["ss", "-Htn", "state", "established", "src", local])
        return {line.split()[3] for line in out.splitlines() if line.strip()}

    def listening(self, host: LanHost) -> set[str]:
        """``ADDR:PORT`` of every listening TCP socket of ``host``."""
        out = self.run(host, ["ss", "-Htln"])
        return {line.split()[3] for line in out.splitlines() if line.strip()}

    def set_forwarding(self, host: LanHost, on: bool) -> None:
        """IPv4 forwarding of ``host`` (a new namespace inherits the machine's setting)."""
        self.run(host, ["sysctl", "-qw", f"net.ipv4.conf.all.forwarding={int(on)}"])


@contextmanager
def one_lan() -> Iterator[Lan]:
    """Hosts A, B, C and their switch (module doc); always removed, even when making them fails halfway."""
    n = next(_counter)
    pid = os.getpid()
    lan = Lan(ns_a=f"phA-{pid}-{n}", ns_b=f"phB-{pid}-{n}", ns_c=f"phC-{pid}-{n}", ns_switch=f"phS-{pid}-{n}",
              subnet=f"10.232.{(pid + n) % 250 + 1}")
    made: list[str] = []
    try:
        for ns in (lan.ns_switch, lan.ns_a, lan.ns_b, lan.ns_c):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", lan.ns_switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", lan.ns_switch, "link", "set", "br0", "up")
        hosts: tuple[LanHost, ...] = ("a", "b", "c")
        for host in hosts:
            port = f"port{host}"
            # Created directly inside the namespaces: no moment in the root namespace.
            _ip("link", "add", lan.dev, "netns", lan.ns(host), "type", "veth", "peer", "name", port,
                "netns", lan.ns_switch)
            _ip("-n", lan.ns_switch, "link", "set", port, "master", "br0")
            _ip("-n", lan.ns_switch, "link", "set", port, "up")
            _ip("-n", lan.ns(host), "addr", "add", f"{lan.addr(host)}/{lan.prefixlen}", "dev", lan.dev)
            _ip("-n", lan.ns(host), "link", "set", lan.dev, "up")
        _ip("-n", lan.ns_a, "addr", "add", lan.service_cidr, "dev", lan.dev)
        yield lan
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{' '.join(err.cmd)} failed: {err.stderr.strip()}") from err
    finally:
        for ns in made:
            _kill_inside(ns)
        for ns in made:
            _ip("netns", "del", ns, check=False)
