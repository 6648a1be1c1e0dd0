"""The address moves with the service, and established TCP connections survive the move.

Hosts A, B and a client host C on one bridge (tests/helpers/netns.py ``one_lan``). A server in A
(the repo's key-value server, or Redis from apt) listens on the service address only, and clients
in C each hold one connection and keep issuing requests (tests/helpers/held_client.py: one socket
for life, never reconnecting, any error ends it). ``pagehaul migrate --move-address`` moves the
server to B: the address leaves A at the frozen point, CRIU dumps the connections open
(``--tcp-established``, network lock skipped), B's receiver adds the address to its service
device, restores, and announces the address. Checked as users see it: every client goes on
getting right answers over the very same connection (its local port is among B's connections
from the service address), nothing reset; the listening socket bound to that address accepts
new connections on B; the address is gone from A; C's neighbour entry for it points at B.

When the move fails after the address left A (a receiver that takes no addresses, or a criu
restore that fails after B added it), the address is back on A and nowhere else, and the source
serves again over the same connections (pagehaul took them out of CRIU's repair mode).

And the destination's own lock: while criu restores, B has the address but answers no ARP for
it, so that nothing can reach B for it (to be answered with a reset) before the restored sockets
exist; afterwards it answers again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pagehaul.criu_tools import CriuTools
from tests.conftest import stop_process
from tests.helpers.netns import LAN_DEV, Lan, LanHost, one_lan, require_netns
from tests.integration.test_full_migration import (
    PAGEHAUL,
    Lines,
    alive,
    kill_restored,
    listening_receiver,
    state,
    wait_for,
)

pytestmark = pytest.mark.criu

ROOT = Path(__file__).resolve().parents[2]
PORT = 7070
CLIENTS = 4
REDIS_KEYS = 50_000  # data for Redis to carry along (its memory is what the restore rebuilds)
READY_TIMEOUT_S = 60.0
MIGRATE_TIMEOUT_S = 240.0
ARP_QUIET_SCRIPT = """
import ipaddress, sys
from pagehaul import netaddr
with netaddr.take([ipaddress.IPv4Interface(sys.argv[1])], sys.argv[2]):
    print("taken", flush=True)
    sys.stdin.readline()
print("announced", flush=True)
sys.stdin.readline()
"""
CONNECT_SCRIPT = """
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("CONNECTED")
except OSError as e:
    print(errno.errorcode.get(e.errno or 0, "timeout"))
"""


@pytest.fixture
def lan() -> Iterator[Lan]:
    require_netns()
    with one_lan() as made:
        yield made


@dataclass
class Client:
    lines: Lines

    @property
    def local(self) -> str:
        return next(line.split()[1] for line in self.lines.lines if line.startswith("local "))

    def ops(self) -> int:
        return self.lines.count("ops ")

    def broken(self) -> list[str]:
        return [line for line in self.lines.lines if line.startswith(("BROKEN", "LOST"))]


def server_argv(kind: str, lan: Lan, tmp_path: Path) -> tuple[list[str], str]:
    """The server bound to the service address only, and the protocol its clients speak."""
    if kind == "kv":
        return [sys.executable, "-m", "tests.helpers.kv_server", "--port", str(PORT), "--log",
                str(tmp_path / "kv.log"), "--bind", lan.service], "kv"
    redis = shutil.which("redis-server")
    assert redis is not None, "redis-server is not installed: run scripts/setup.sh --servers"
    return [redis, "--port", str(PORT), "--bind", lan.service, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--logfile", str(tmp_path / "redis.log")], "redis"


@contextmanager
def service_in_a(lan: Lan, argv: list[str]) -> Iterator[int]:
    """``argv`` as the init of a new PID namespace and session in A, listening on the service
    address; yields its pid. (No --kill-child: CRIU would restore the parent-death signal.)"""
    outer = subprocess.Popen(lan.argv("a", ["unshare", "--pid", "--fork", "setsid", *argv]), text=True, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
    try:
        wait_for("the server to start", lambda: not alive(outer.pid) or bool(children.read_text().split()),
                 READY_TIMEOUT_S)
        assert alive(outer.pid), "unshare failed"
        inner = int(children.read_text().split()[0])
        try:
            wait_for(f"the server to listen on {lan.service}:{PORT}",
                     lambda: f"{lan.service}:{PORT}" in lan.listening("a") or not alive(inner), READY_TIMEOUT_S)
            assert alive(inner), "the server exited"
            yield inner
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner, signal.SIGKILL)  # the namespace's init: its namespace goes with it
    finally:
        stop_process(outer)


def start_client(lan: Lan, stack: contextlib.ExitStack, protocol: str, name: str) -> Client:
    proc = subprocess.Popen(lan.argv("c", [sys.executable, "-m", "tests.helpers.held_client", "--address",
                                           lan.service, "--port", str(PORT), "--name", name, "--protocol",
                                           protocol]),
                            text=True, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    stack.callback(stop_process, proc)
    client = Client(Lines(proc))
    wait_for(f"client {name} under way", lambda: client.ops() > 0 or proc.poll() is not None)
    assert proc.poll() is None, client.lines.lines
    return client


def start_clients(lan: Lan, stack: contextlib.ExitStack, protocol: str) -> list[Client]:
    return [start_client(lan, stack, protocol, f"c{i}") for i in range(CLIENTS)]


def go_on(clients: list[Client], what: str) -> None:
    """Every client answers at least two more report lines' worth of requests, none broken."""
    at = [c.ops() for c in clients]
    for c, n in zip(clients, at, strict=True):
        proc = c.lines.proc
        wait_for(f"{what}: client {c.local} going on",
                 lambda c=c, n=n, p=proc: c.ops() >= n + 2 or p.poll() is not None)  # type: ignore[misc]
        assert proc.poll() is None, c.lines.lines[-5:]
        assert not c.broken(), c.broken()


def finish(clients: list[Client]) -> None:
    for c in clients:
        c.lines.proc.send_signal(signal.SIGTERM)
    for c in clients:
        assert c.lines.proc.wait(timeout=60) == 0, c.lines.lines[-5:]
        wait_for("the client's last line", lambda c=c: c.lines.count("done ") > 0)  # type: ignore[misc]
        assert not c.broken(), c.broken()


@contextmanager
def receiver_in(lan: Lan, host: LanHost, tmp_path: Path, *extra: str) -> Iterator[str]:
    """``pagehaul receive`` in ``host`` on its own address; yields HOST:PORT; always killed."""
    with listening_receiver(lan.argv(host, [*PAGEHAUL, "-v", "receive", "--insecure", "--listen",
                                            f"{lan.addr(host)}:0", "--images-dir", str(tmp_path / "images"), *extra]),
                            tmp_path / f"receiver-{host}.log", cwd=ROOT) as address:
        yield address


def migrate(lan: Lan, tmp_path: Path, pid: int, address: str, criu: CriuTools,
            *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    """``pagehaul migrate --json`` in A: (exit code, result or None, stderr)."""
    log = tmp_path / "migrate.log"
    with log.open("w") as err:
        proc = subprocess.run(lan.argv("a", [*PAGEHAUL, "-v", "migrate", "--pid", str(pid), "--to", address,
                                             "--insecure", "--json", "--criu", str(criu.criu), "--dump-dir",
                                             str(tmp_path), *extra]),
                              text=True, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                              timeout=MIGRATE_TIMEOUT_S, check=False)
    result = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, result, log.read_text()


def redis_cli(lan: Lan, *args: str, stdin: str | None = None) -> str:
    """``redis-cli`` from C against the service address."""
    proc = subprocess.run(lan.argv("c", ["redis-cli", "-h", lan.service, "-p", str(PORT), *args]), input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def same_netns(pid: int, lan: Lan, host: LanHost) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{lan.ns(host)}").st_ino


def arp_ignore(lan: Lan, host: LanHost) -> str:
    return lan.run(host, ["cat", f"/proc/sys/net/ipv4/conf/{lan.dev}/arp_ignore"]).strip()


def connect(lan: Lan, host: LanHost, addr: str, port: int) -> str:
    """``CONNECTED``, or the errno name (``ECONNREFUSED``, ``EHOSTUNREACH``, …) of a connect from ``host``."""
    return lan.run(host, [sys.executable, "-c", CONNECT_SCRIPT, addr, str(port)]).strip()


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "forwarding"), [("kv", False), ("kv", True), ("redis", False)],
                         ids=["kv-server", "kv-server-hosts-forward", "redis"])
def test_connections_survive_the_move(lan: Lan, tmp_path: Path, criu_tools: CriuTools, server: str,
                                      forwarding: bool) -> None:
    # Forwarding on A changes what A does with the clients' segments once the address is gone
    # (module doc of pagehaul.netaddr): neither way may it reset or answer them.
    for host in ("a", "b", "c"):
        lan.set_forwarding(host, forwarding)
    argv, protocol = server_argv(server, lan, tmp_path)
    endpoint = f"{lan.service}:{PORT}"
    with service_in_a(lan, argv) as pid, contextlib.ExitStack() as stack:
        if server == "redis":
            out = redis_cli(lan, "--pipe", stdin="".join(f"SET k{i} v{i}\r\n" for i in range(REDIS_KEYS)))
            assert "errors: 0" in out, out
        clients = start_clients(lan, stack, protocol)
        ends = {c.local for c in clients}
        assert lan.connections("a", endpoint) == ends
        assert lan.neighbour("c", lan.service) == lan.mac("a")
        # B knows C already, as hosts on one segment do: the restored sockets' first segments
        # then need no ARP request from B (one from the service address would tell C where it
        # went), and only the gratuitous ARP can.
        assert connect(lan, "b", lan.addr("c"), 9) == "ECONNREFUSED"
        assert lan.neighbour("b", lan.addr("c")) == lan.mac("c")
        with receiver_in(lan, "b", tmp_path, "--restore", "--criu", str(criu_tools.criu),
                         "--service-device", lan.dev) as address:
            rc, result, err = migrate(lan, tmp_path, pid, address, criu_tools, "--move-address", lan.service_cidr)
            assert rc == 0, f"migrate failed ({rc}): {err[-3000:]}"
            assert result is not None
            restored = result["restored_pid"]
            stack.callback(kill_restored, restored)
        # Announced before the receiver answered: C sends to B now, not to A's MAC.
        assert lan.neighbour("c", lan.service) == lan.mac("b"), "the gratuitous ARP reached C"
        assert result["moved_addresses"] == [lan.service_cidr]
        assert same_netns(restored, lan, "b"), "the server runs on B"
        wait_for("the source to be gone", lambda: not alive(pid), 10)

        assert lan.service_cidr not in lan.addresses("a"), "the address left A"
        assert lan.service_cidr in lan.addresses("b"), "the address is on B's service device"
        go_on(clients, "after the move")
        assert lan.connections("b", endpoint) == ends, "the very same connections, now served by B"
        assert arp_ignore(lan, "b") == "0", "B answers ARP again"

        # The listening socket, bound to the address itself, came along and accepts on B.
        assert endpoint in lan.listening("b")
        newcomer = start_client(lan, stack, protocol, "new")
        go_on([newcomer], "a new connection to B")
        assert newcomer.local not in ends
        finish([*clients, newcomer])
        if server == "redis":
            assert int(redis_cli(lan, "DBSIZE")) >= REDIS_KEYS
            assert [redis_cli(lan, "GET", f"k{i}") for i in (0, REDIS_KEYS // 2, REDIS_KEYS - 1)] == \
                ["v0", f"v{REDIS_KEYS // 2}", f"v{REDIS_KEYS - 1}"]
        assert alive(restored)


@pytest.mark.parametrize("receiver_args", [[], ["--criu", "/bin/false", "--service-device", LAN_DEV]],
                         ids=["receiver-takes-no-addresses", "criu-restore-fails"])
def test_failed_move_gives_the_address_back(lan: Lan, tmp_path: Path, criu_tools: CriuTools,
                                            receiver_args: list[str]) -> None:
    argv, protocol = server_argv("kv", lan, tmp_path)
    endpoint = f"{lan.service}:{PORT}"
    with service_in_a(lan, argv) as pid, contextlib.ExitStack() as stack:
        clients = start_clients(lan, stack, protocol)
        ends = {c.local for c in clients}
        with receiver_in(lan, "b", tmp_path, "--restore", *receiver_args) as address:
            rc, _, err = migrate(lan, tmp_path, pid, address, criu_tools, "--move-address", lan.service)
        assert rc == 5, f"expected a transport failure (5), got {rc}: {err[-3000:]}"
        assert "--service-device" in err or "criu restore failed" in err, err[-2000:]
        assert "Traceback" not in err
        assert f"address {lan.service_cidr} given back to {lan.dev}" in err

        assert lan.addresses("a") == {f"{lan.addr('a')}/24", lan.service_cidr}, "the address is back on A"
        assert lan.service_cidr not in lan.addresses("b"), "and nowhere else"
        assert arp_ignore(lan, "b") == "0"
        assert alive(pid)
        assert state(pid) != "T", "the source was continued"
        go_on(clients, "after the failed move")
        assert lan.connections("a", endpoint) == ends, "the same connections, served by A again"
        newcomer = start_client(lan, stack, protocol, "new")
        go_on([newcomer], "a new connection to A")
        finish([*clients, newcomer])


def test_destination_answers_no_arp_for_the_address_until_restored(lan: Lan) -> None:
    """B's lock: while the address is taken for a restore, a host that asks who has it gets no
    answer (so it cannot send B a segment that B would answer with a reset); afterwards B
    answers, and a connection attempt reaches B (refused: nothing listens there)."""
    lan.run("a", ["ip", "addr", "del", lan.service_cidr, "dev", lan.dev])  # nobody has it now
    before = arp_ignore(lan, "b")
    with subprocess.Popen(lan.argv("b", [sys.executable, "-c", ARP_QUIET_SCRIPT, lan.service_cidr, lan.dev]),
                          text=True, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdin is not None
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "taken", proc.stderr.read() if proc.stderr else ""
            assert lan.service_cidr in lan.addresses("b")
            assert arp_ignore(lan, "b") == "8"
            assert connect(lan, "c", lan.service, 9) in ("EHOSTUNREACH", "timeout"), "B answers for it too early"
            assert lan.neighbour("c", lan.service) is None, "nobody told C a MAC for the address"
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "announced"
            assert arp_ignore(lan, "b") == before
            assert connect(lan, "c", lan.service, 9) == "ECONNREFUSED", "B answers for the address now"
            assert lan.neighbour("c", lan.service) == lan.mac("b")
            assert lan.service_cidr in lan.addresses("b"), "a successful take keeps the address"
        finally:
            stop_process(proc)
