"""Full migration between two hosts: ``pagehaul migrate`` (pre-copy + CRIU) and ``criu restore`` there.

The hosts are two network namespaces joined by a veth pair (tests/helpers/netns.py); each side
sees only its own address. Commands enter only the network namespace (``nsenter --net``), so
source, destination and CRIU share the mount namespace, as two hosts with the same files would.
The workloads run in a PID namespace of their own, as a container's processes do, and CRIU
restores them into a fresh one on B while the frozen source still holds its pids on A.

What is checked is what users see: the restored process runs in B's network namespace and keeps
verifying its own memory (every region against the checksums it kept, migrated along), the source
is gone; a TCP server's clients reconnect and find every key they stored; and when the destination
cannot restore, the source keeps running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pagehaul.criu_tools import CriuTools
from pagehaul.security import make_test_pki
from tests.conftest import stop_process
from tests.helpers.children import wait_until
from tests.helpers.netns import Side, TwoHosts

pytestmark = pytest.mark.criu

PAGEHAUL = [sys.executable, "-m", "cli"]
READY_TIMEOUT_S = 60.0
MIGRATE_TIMEOUT_S = 240.0
PROGRESS_TIMEOUT_S = 60.0
KV_PORT = 7070


def in_ns(hosts: TwoHosts, side: Side, argv: list[str]) -> list[str]:
    """``argv`` in the network namespace of ``side`` only (mounts, pids: the host's)."""
    return ["nsenter", f"--net=/run/netns/{hosts.ns(side)}", *argv]


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = PROGRESS_TIMEOUT_S) -> None:
    wait_until(condition, what, timeout_s)


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def vpid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[-1]) for line in f if line.startswith("NSpid:"))


@dataclass
class Lines:
    """A child's stdout, read into a list by a thread (so waiting never blocks on a pipe)."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, prefix: str) -> int:
        return sum(1 for line in list(self.lines) if line.startswith(prefix))


@contextmanager
def receiver_in_b(hosts: TwoHosts, tmp_path: Path, *extra: str, pki: Path | None = None,
                  side: Side = "b") -> Iterator[str]:
    """``pagehaul receive`` in B (or ``side``) on its veth address; yields HOST:PORT; always killed."""
    addr = hosts.addr_b if side == "b" else hosts.addr_a
    with listening_receiver(in_ns(hosts, side, [*PAGEHAUL, "-v", "receive", *security_args(pki, "receiver"),
                                                "--listen", f"{addr}:0",
                                                "--images-dir", str(tmp_path / f"images-{side}"), *extra]),
                            tmp_path / f"receiver-{side}.log") as address:
        yield address


@contextmanager
def listening_receiver(argv: list[str], log: Path, cwd: Path | None = None) -> Iterator[str]:
    """Start the ``pagehaul receive`` command ``argv`` (stderr into ``log``); yields the HOST:PORT it
    says it listens on; always killed."""
    with log.open("w") as err:
        proc = subprocess.Popen(argv, text=True, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
    try:
        out = Lines(proc)
        prefix = "pagehaul receiver listening on "
        wait_for(f"receiver start; log: {log}", lambda: out.count(prefix) > 0 or proc.poll() is not None,
                 READY_TIMEOUT_S)
        assert out.count(prefix), f"receiver did not start: {log.read_text()[-2000:]}"
        yield next(line for line in out.lines if line.startswith(prefix))[len(prefix):].strip()
    finally:
        stop_process(proc)


@contextmanager
def in_pidns(hosts: TwoHosts, argv: list[str], *, own_session: bool = True) -> Iterator[int]:
    """``argv`` as the init of a new PID namespace (its own session unless ``own_session`` is
    False) in A; yields its host pid."""
    # No --kill-child: CRIU would restore its parent-death signal, and the restored task would be
    # killed as soon as criu restore (its parent then) exits.
    setsid = ["setsid"] if own_session else []
    outer = subprocess.Popen(in_ns(hosts, "a", ["unshare", "--pid", "--fork", *setsid, *argv]),
                             text=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
    try:
        wait_for("the workload to start", lambda: not alive(outer.pid) or bool(children.read_text().split()),
                 READY_TIMEOUT_S)
        assert alive(outer.pid), "unshare failed"
        inner = int(children.read_text().split()[0])
        try:
            yield inner
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner, signal.SIGKILL)  # the namespace's init: its namespace goes with it
    finally:
        stop_process(outer)


def security_args(pki: Path | None, role: str) -> list[str]:
    """Mutual TLS with the test CA in ``pki`` (``pagehaul certs``), or plain TCP."""
    if pki is None:
        return ["--insecure"]
    return ["--tls-cert", str(pki / f"{role}.crt"), "--tls-key", str(pki / f"{role}.key"),
            "--tls-ca", str(pki / "ca.crt")]


def migrate(hosts: TwoHosts, tmp_path: Path, pid: int, address: str, criu: CriuTools,
            *extra: str, pki: Path | None = None, side: Side = "a") -> tuple[int, dict[str, Any] | None, str]:
    """``pagehaul migrate --json`` in A (or ``side``): (exit code, result or None, stderr)."""
    log = tmp_path / "migrate.log"
    with log.open("w") as err:
        proc = subprocess.run(in_ns(hosts, side, [*PAGEHAUL, "-v", "migrate", "--pid", str(pid), "--to", address,
                                                 *security_args(pki, "sender"), "--json", "--criu", str(criu.criu),
                                                 "--dump-dir", str(tmp_path), *extra]),
                              text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                              timeout=MIGRATE_TIMEOUT_S, check=False)
    result = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, result, log.read_text()


def migrate_ok(hosts: TwoHosts, tmp_path: Path, pid: int, address: str, criu: CriuTools,
               *extra: str, pki: Path | None = None, side: Side = "a") -> dict[str, Any]:
    rc, result, err = migrate(hosts, tmp_path, pid, address, criu, *extra, pki=pki, side=side)
    assert rc == 0, f"migrate failed ({rc}): {err[-3000:]}"
    assert result is not None
    return result


def log_lines(path: Path, prefix: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(prefix)] if path.exists() else []


def kill_restored(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # reparented to init, which reaps it


def same_netns(pid: int, hosts: TwoHosts, side: Side) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{hosts.ns(side)}").st_ino


SELFCHECK = [sys.executable, "-m", "pagehaul.selfcheck", "--size-mib", "32", "--regions", "32",
             "--rate-mib-s", "64"]


def test_selfchecking_process_moves_to_b_and_keeps_verifying(hosts: TwoHosts, tmp_path: Path,
                                                            criu_tools: CriuTools) -> None:
    log = tmp_path / "selfcheck.log"
    pki = tmp_path / "pki"
    make_test_pki(pki, names=[hosts.addr_b])  # mutual TLS, as users run it; an IP SAN for B
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid:
        assert vpid(pid) == 1
        assert same_netns(pid, hosts, "a")
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu), pki=pki) as address:
            result = migrate_ok(hosts, tmp_path, pid, address, criu_tools, pki=pki)
            restored = result["restored_pid"]
            try:
                passes_at_move = len(log_lines(log, "pass "))
                wait_for("the source to be gone", lambda: not alive(pid), 10)
                assert alive(restored)
                assert state(restored) != "T"
                assert vpid(restored) == 1, "restored into a fresh PID namespace, as its init"
                assert same_netns(restored, hosts, "b"), "the restored process lives on host B"
                # It keeps writing and verifying every region against the checksums it carried along.
                wait_for("two more verified passes on B",
                         lambda: len(log_lines(log, "pass ")) >= passes_at_move + 2 or bool(log_lines(log, "BAD")))
                assert not log_lines(log, "BAD"), log.read_text()[-500:]
                assert alive(restored)
            finally:
                kill_restored(restored)
    d = result["downtime"]
    assert d["total_us"] >= d["final_round_us"] + d["criu_dump_us"] + d["restore_us"] > 0
    assert result["tasks"] == 1
    assert result["shipped_files"] > 0
    assert result["dropped_pages"] > result["extra_pages"], "CRIU's memory stayed home; only its extra pages moved"
    phases = result["phases"]
    assert [p["phase"] for p in phases] == ["precopy", "frozen", "committed", "criu-dump", "shipping", "restoring",
                                            "running"]
    assert [p["start_us"] for p in phases] == sorted(p["start_us"] for p in phases)
    assert "phases" not in result["send"]


@pytest.mark.parametrize("receiver_args", [[], ["--restore", "--criu", "/bin/false"]],
                         ids=["receiver-without-restore", "criu-restore-fails"])
def test_failed_restore_leaves_the_source_running(hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools,
                                                  receiver_args: list[str]) -> None:
    log = tmp_path / "selfcheck.log"
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, *receiver_args) as address:
            rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools)
        assert rc == 5, f"expected a transport failure (5), got {rc}: {err[-2000:]}"
        assert "does not restore processes" in err or "criu restore failed" in err, err[-2000:]
        assert "Traceback" not in err
        passes = len(log_lines(log, "pass "))
        assert alive(pid)
        assert state(pid) != "T", "the source was continued"
        wait_for("the source to go on verifying", lambda: len(log_lines(log, "pass ")) > passes)
        assert not log_lines(log, "BAD")


def test_restore_answer_lost_leaves_the_source_stopped(hosts: TwoHosts, tmp_path: Path,
                                                      criu_tools: CriuTools) -> None:
    """Every image went to B and the call broke while B restores (here: the sender's deadline
    passes while a CRIU action script holds B's restore): the sender cannot know whether the tree
    runs on B, so it neither continues nor kills the source, and says how to decide."""
    log = tmp_path / "selfcheck.log"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    script = tmp_path / "hold-restore.sh"
    script.write_text(f'#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] || exit 0\n'
                      f'read -r word < {gate}\n[ "$word" = go ]\n')
    script.chmod(0o755)
    with in_pidns(hosts, [*SELFCHECK, "--log", str(log)]) as pid:
        wait_for("a first verified pass", lambda: bool(log_lines(log, "pass ")))
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu),
                           f"--criu-opt=--action-script={script}") as address:
            try:
                rc, _, err = migrate(hosts, tmp_path, pid, address, criu_tools, "--restore-timeout", "5")
                assert rc == 10, f"expected an unknown outcome (10), got {rc}: {err[-2000:]}"
                assert "the destination may be running the tree" in err, err[-2000:]
                assert f"kill -CONT {pid}" in err, err[-2000:]
                assert f"kill -KILL {pid}" in err, err[-2000:]
                assert "Traceback" not in err
                assert alive(pid)
                assert state(pid) == "T", "the source must stay stopped until someone decides"
            finally:
                # B's restore fails now (the script exits 1), so nothing of the tree runs there.
                with contextlib.suppress(OSError):  # ENXIO: the script never got to open the gate
                    fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
                    os.write(fd, b"stop\n")
                    os.close(fd)


def test_tcp_server_moves_and_its_clients_find_their_data(hosts: TwoHosts, tmp_path: Path,
                                                          criu_tools: CriuTools) -> None:
    log = tmp_path / "kv.log"
    server = [sys.executable, "-m", "tests.helpers.kv_server", "--port", str(KV_PORT), "--log", str(log)]
    with in_pidns(hosts, server) as pid, contextlib.ExitStack() as stack:
        wait_for("the server to listen", lambda: bool(log_lines(log, "listening")))
        clients = []
        for i in range(4):
            proc = subprocess.Popen(
                in_ns(hosts, "a", [sys.executable, "-m", "tests.helpers.kv_client", "--addresses",
                                   f"{hosts.addr_a},{hosts.addr_b}", "--port", str(KV_PORT), "--name", f"c{i}"]),
                text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[2])
            stack.callback(stop_process, proc)
            clients.append(Lines(proc))
        for c in clients:
            wait_for("clients under load", lambda c=c: c.count("ops ") > 0 or c.proc.poll() is not None)  # type: ignore[misc]
            assert c.proc.poll() is None, c.lines
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu)) as address:
            result = migrate_ok(hosts, tmp_path, pid, address, criu_tools, "--tcp-close")
            restored = result["restored_pid"]
            stack.callback(kill_restored, restored)
            assert same_netns(restored, hosts, "b")
            for c in clients:
                wait_for("every client to reconnect to B and verify its keys",
                         lambda c=c: c.count("verified ") > 0 or c.proc.poll() is not None)  # type: ignore[misc]
                assert c.proc.poll() is None, c.lines
                assert f"connected {hosts.addr_b}" in c.lines
                ops_now = c.count("ops ")
                wait_for("load to go on against B",
                         lambda c=c, n=ops_now: c.count("ops ") > n or c.proc.poll() is not None)  # type: ignore[misc]
            for c in clients:
                c.proc.send_signal(signal.SIGTERM)
            for c in clients:
                assert c.proc.wait(timeout=30) == 0, c.lines
                wait_for("the client's last line", lambda c=c: c.count("done ") > 0)  # type: ignore[misc]
                assert not [line for line in c.lines if line.startswith("LOST")], c.lines
        assert not alive(pid)


def passes_by_pid(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log_lines(log, "pass "):
        pid = next(tok for tok in line.split() if tok.startswith("pid="))
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_process_tree_with_shared_memory_moves_whole(hosts: TwoHosts, tmp_path: Path,
                                                     criu_tools: CriuTools) -> None:
    """A parent and two children, each checking private memory of its own and a shared anonymous
    region they all map: pagehaul moves every process and the shared object (once), CRIU the rest."""
    log = tmp_path / "selfcheck.log"
    with in_pidns(hosts, [*SELFCHECK, "--children", "2", "--shared-mib", "8", "--log", str(log)]) as pid:
        wait_for("every process to verify a pass", lambda: len(passes_by_pid(log)) == 3)
        with receiver_in_b(hosts, tmp_path, "--restore", "--criu", str(criu_tools.criu)) as address:
            result = migrate_ok(hosts, tmp_path, pid, address, criu_tools)
            restored = result["restored_pid"]
            try:
                at_move = passes_by_pid(log)
                assert len(at_move) == 3
                wait_for("two more passes by every restored process",
                         lambda: all(passes_by_pid(log).get(p, 0) >= n + 2 for p, n in at_move.items())
                         or bool(log_lines(log, "BAD")))
                assert not log_lines(log, "BAD"), log.read_text()[-500:]
                assert same_netns(restored, hosts, "b")
            finally:
                kill_restored(restored)  # the namespace's init: its children go with it
    assert result["tasks"] == 3
    assert result["send"]["processes"] == 3
    assert result["send"]["shmem_objects"] == 1
    assert result["shipped_bytes"] < 4 << 20, "the 8 MiB shared region came from pagehaul, not CRIU's dump"
    session = Path(result["images_dir"]).parents[1]
    final = sorted(session.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert len(list(final.glob("pagemap-shmem-*.img"))) == 1, "the shared region is stored once"
    vpids = sorted(int(p.split("=")[1]) for p in at_move)
    assert vpids[0] == 1
    assert sorted(p.name for p in final.glob("pagemap-[0-9]*.img")) == sorted(f"pagemap-{v}.img" for v in vpids)
