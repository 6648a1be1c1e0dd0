"""``pagehaul migrate --check`` and the preflight every migration runs: each problem a real tree
can have is named with its fix before anything is frozen, and the source is left as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagehaul.criu_tools import CriuTools
from pagehaul.security import make_test_pki
from tests.conftest import stop_process
from tests.helpers.netns import TwoHosts
from tests.integration.test_full_migration import (
    PAGEHAUL,
    SELFCHECK,
    Lines,
    alive,
    in_ns,
    in_pidns,
    log_lines,
    migrate,
    receiver_in_b,
    security_args,
    state,
    wait_for,
)

pytestmark = pytest.mark.criu


def check(hosts: TwoHosts, pid: int, address: str, criu: CriuTools, *extra: str,
          pki: Path | None = None) -> tuple[int, str]:
    proc = subprocess.run(in_ns(hosts, "a", [*PAGEHAUL, "migrate", "--check", "--pid", str(pid), "--to", address,
                                             *security_args(pki, "sender"), "--criu", str(criu.criu), *extra]),
                          capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_check_passes_a_migratable_tree_and_freezes_nothing(hosts: TwoHosts, tmp_path: Path,
                                                           criu_tools: CriuTools) -> None:
    log = tmp_path / "selfcheck.log"
    pki = tmp_path / "pki"
    make_test_pki(pki, names=[hosts.addr_b])
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid, \
            receiver_in_b(hosts, tmp_path, "--restore", pki=pki) as address:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        rc, out = check(hosts, pid, address, criu_tools, pki=pki)
        assert rc == 0, out
        assert "problem" not in out
        assert "certificate names it" in out
        passes = len(log_lines(log, "pass "))
        wait_for("the workload to go on", lambda: len(log_lines(log, "pass ")) > passes)
        assert state(pid) != "T"


def test_check_names_a_certificate_without_the_destination_address(hosts: TwoHosts, tmp_path: Path,
                                                                 criu_tools: CriuTools) -> None:
    log = tmp_path / "selfcheck.log"
    pki = tmp_path / "pki"
    make_test_pki(pki)  # 127.0.0.1 and localhost only: not B's address
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid, \
            receiver_in_b(hosts, tmp_path, "--restore", pki=pki) as address:
        rc, out = check(hosts, pid, address, criu_tools, pki=pki)
        assert rc == 2, out
        assert f"certificate does not name {hosts.addr_b}: make it with pagehaul certs --name {hosts.addr_b}" in out


def test_established_connection_needs_tcp_close(hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools) -> None:
    log = tmp_path / "kv.log"
    server = [sys.executable, "-m", "tests.helpers.kv_server", "--port", "7071", "--log", str(log)]
    with in_pidns(hosts, server) as pid, receiver_in_b(hosts, tmp_path, "--restore") as address:
        wait_for("the server to listen", lambda: bool(log_lines(log, "listening")))
        client = subprocess.Popen(in_ns(hosts, "a", [sys.executable, "-m", "tests.helpers.kv_client", "--addresses",
                                                     hosts.addr_a, "--port", "7071", "--name", "c0"]),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, cwd=Path(__file__).resolve().parents[2])
        try:
            lines = Lines(client)
            wait_for("the client to connect", lambda: lines.count("connected") > 0 or client.poll() is not None)
            rc, out = check(hosts, pid, address, criu_tools)
            assert rc == 2, out
            assert "established TCP connection" in out
            assert "--tcp-close" in out
            assert "--move-address" in out
            rc, out = check(hosts, pid, address, criu_tools, "--tcp-close")
            assert rc == 0, out
        finally:
            stop_process(client)


def test_move_address_is_checked_against_the_hosts_addresses_and_the_connections(
        hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools) -> None:
    """``--move-address`` keeps connections only on the addresses that move: an address this host
    lacks, or a connection from an address that stays, is named before anything is frozen."""
    log = tmp_path / "kv.log"
    server = [sys.executable, "-m", "tests.helpers.kv_server", "--port", "7071", "--log", str(log)]
    extra = "192.0.2.7"  # a second address of A (TEST-NET-1, inside the namespace only)
    subprocess.run(["ip", "-n", hosts.ns_a, "addr", "add", f"{extra}/32", "dev", hosts.dev_a], check=True,
                   capture_output=True, timeout=10)
    with in_pidns(hosts, server) as pid, receiver_in_b(hosts, tmp_path, "--restore") as address:
        wait_for("the server to listen", lambda: bool(log_lines(log, "listening")))
        client = subprocess.Popen(in_ns(hosts, "a", [sys.executable, "-m", "tests.helpers.kv_client", "--addresses",
                                                     hosts.addr_a, "--port", "7071", "--name", "c0"]),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, cwd=Path(__file__).resolve().parents[2])
        try:
            lines = Lines(client)
            wait_for("the client to connect", lambda: lines.count("connected") > 0 or client.poll() is not None)
            rc, out = check(hosts, pid, address, criu_tools, "--move-address", "198.51.100.9")
            assert rc == 2, out
            assert "--move-address 198.51.100.9: 198.51.100.9 is not an address of this host" in out
            rc, out = check(hosts, pid, address, criu_tools, "--move-address", f"{extra}/24")
            assert rc == 2, out
            assert f"{extra}/24 was asked for, but this host has {extra}/32" in out
            rc, out = check(hosts, pid, address, criu_tools, "--move-address", extra)
            assert rc == 2, out
            assert f"established TCP connection from {hosts.addr_a}:7071, an address that does not move" in out
            assert f"ok  address: {extra}/32 on {hosts.dev_a}: removed here at the frozen point" in out
            rc, out = check(hosts, pid, address, criu_tools, "--move-address", hosts.addr_a, "--move-address", extra)
            assert rc == 0, out
            assert extra in {a.split("/")[0] for a in _addresses(hosts.ns_a)}, "--check moves nothing"
        finally:
            stop_process(client)


def _addresses(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-br", "-4", "addr"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    return [word for line in out.splitlines() for word in line.split()[2:]]


def test_session_leader_outside_the_pid_namespace_is_refused_before_freezing(hosts: TwoHosts, tmp_path: Path,
                                                                            criu_tools: CriuTools) -> None:
    """CRIU would refuse this tree only at the frozen point; the preflight refuses it first, with
    the fix, and the source never stops."""
    log = tmp_path / "selfcheck.log"
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)], own_session=False) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu)) as address:
            rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools)
        assert rc == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"pagehaul: error: cannot migrate process {pid}: session:"), last
        assert "setsid" in last
        assert "Traceback" not in err
        assert alive(pid)
        assert state(pid) != "T"


def test_unprivileged_task_with_the_hosts_proc_is_refused(hosts: TwoHosts, tmp_path: Path,
                                                         criu_tools: CriuTools) -> None:
    sleeper = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"]
    with in_pidns(hosts, sleeper) as pid, receiver_in_b(hosts, tmp_path, "--restore") as address:
        rc, out = check(hosts, pid, address, criu_tools)
        assert rc == 2, out
        assert "runs as uid 65534 and sees a /proc that is not its own" in out
        assert "--mount-proc" in out


def test_criu_options_reach_criu_and_dangerous_ones_are_refused(hosts: TwoHosts, tmp_path: Path,
                                                               criu_tools: CriuTools) -> None:
    """``--criu-opt`` reaches ``criu dump`` (an option criu rejects makes the dump fail with criu's
    reason, and the source goes on); one that would break the handover is refused up front."""
    log = tmp_path / "selfcheck.log"
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu)) as address:
            rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools, "--criu-opt=--leave-running")
            assert rc == 2, err[-2000:]
            assert "criu dump option '--leave-running' is refused: the source must stay stopped" in err
            rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools, "--criu-opt=--manage-cgroups=bogus")
        assert rc == 1, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("pagehaul: error: criu dump failed"), last
        assert "Unknown cgroups mode `bogus'" in last  # criu's own words, printed before its log was open
        assert "Traceback" not in err
        passes = len(log_lines(log, "pass "))
        assert alive(pid)
        wait_for("the source to go on verifying", lambda: len(log_lines(log, "pass ")) > passes)
        assert state(pid) != "T"
