"""Two hosts for real: sender and receiver in two network namespaces joined by a veth pair.

The receiver is ``pagehaul receive`` inside namespace B on its veth address, with mutual TLS (its
certificate carries that address as an IP SAN); the sender is ``pagehaul send … --json`` inside
namespace A. Namespace A has only ``lo`` and its veth end, so every byte of a migration crosses
the veth (its counters are checked too). The workload stays in the root namespace: ``ip netns
exec`` changes only the network namespace, so the sender still sees it in /proc and can ptrace it.

Cuts are real link failures: ``ip link set … down`` on one veth end, so that the other end loses
its carrier. The host on the carrier-less side sees only silence (no reset, no close, no error):
it has to notice the dead peer by itself. In the resumable cut that is the sender (the receiver's
end goes down for FAULT_S); in the cut that outlasts ``--resume-deadline`` it is the receiver (the
sender's end goes down and stays down, as if the source host dropped off the network for good).
The sender's egress is shaped with ``tc tbf`` so that round 0 of a 256 MiB workload takes seconds,
and the cut is made once the receiver's open round-0 directory holds a good part of the pages (a
bounded poll on the images directory). The only fixed wait is the fault itself: how long the link
stays down.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli.demo import dump_ranges
from pagehaul import procfs
from pagehaul.errors import ProcessGone
from pagehaul.kernel import PAGE_SIZE
from pagehaul.oracle import verify_against_process
from pagehaul.security import make_test_pki
from tests.conftest import Workload, start_workload, stop_process
from tests.helpers.netns import Side, TwoHosts

PAGEHAUL = [sys.executable, "-m", "cli"]
POLL_S = 0.02  # between looks at a directory, a socket table or /proc; never a synchronisation by itself
SHAPED_RATE = "200mbit"  # slow enough that round 0 of the workload is still running when the link is cut
CUT_AFTER_BYTES = 16 << 20  # cut once the open round 0 holds this much of pages-1.img
FAULT_S = 2.0  # how long the link stays down in the resumable cut: the fault, not a synchronisation
RESUME_DEADLINE_S = 2.0  # the sender's --resume-deadline in the cut that outlasts it
RESUME_WINDOW_S = 2.0  # the receiver's --resume-window there
DETECT_TIMEOUT_S = 15.0  # a side must notice a dead link within this
READY_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 60.0


# --- helpers -----------------------------------------------------------------------------------


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float,
             abort: Callable[[], str | None] = lambda: None, log: Path | None = None) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` or as soon as ``abort`` says why
    (with the end of ``log``, the side's stderr, in the message)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        why = abort()
        if why is None and time.monotonic() > deadline:
            why = f"not within {timeout_s:g} s"
        if why is not None:
            tail = f"\n{log.name}:\n{log.read_text()[-3000:]}" if log is not None else ""
            pytest.fail(f"{why}: {what}{tail}")
        time.sleep(POLL_S)


@dataclass
class ReceiverProc:
    proc: subprocess.Popen[str]
    address: str
    images: Path
    log: Path


@dataclass(frozen=True)
class Pki:
    root: Path

    def args(self, role: str) -> list[str]:
        return ["--tls-cert", str(self.root / f"{role}.crt"), "--tls-key", str(self.root / f"{role}.key"),
                "--tls-ca", str(self.root / "ca.crt")]


@pytest.fixture
def pki(hosts: TwoHosts, tmp_path: Path) -> Pki:
    root = tmp_path / "pki"
    make_test_pki(root, names=[hosts.addr_b])  # an IP SAN for the receiver's veth address
    return Pki(root)


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else ""


@contextmanager
def receiver_in_b(hosts: TwoHosts, pki: Pki, tmp_path: Path, *extra: str) -> Iterator[ReceiverProc]:
    """``pagehaul receive`` in namespace B on its veth address (a kernel-chosen port); always killed."""
    images, log = tmp_path / "images", tmp_path / "receiver.log"
    with log.open("w") as err:
        proc = hosts.popen("b", [*PAGEHAUL, "-v", "receive", "--listen", f"{hosts.addr_b}:0", "--images-dir",
                                 str(images), *pki.args("receiver"), *extra],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        line = _read_line(proc, READY_TIMEOUT_S)
        prefix = "pagehaul receiver listening on "
        assert line.startswith(prefix), f"receiver did not start: {line!r}; log: {log.read_text()[-2000:]}"
        yield ReceiverProc(proc, line[len(prefix):].strip(), images, log)
    finally:
        stop_process(proc)


@contextmanager
def sender_in_a(hosts: TwoHosts, pki: Pki, tmp_path: Path, pid: int, address: str,
                *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``pagehaul send --json`` in namespace A; always killed and reaped."""
    with (tmp_path / "sender.log").open("w") as err:
        proc = hosts.popen("a", [*PAGEHAUL, "send", "--pid", str(pid), "--to", address, "--json",
                                 *pki.args("sender"), *extra],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        yield proc
    finally:
        stop_process(proc)


def finish(proc: subprocess.Popen[str], tmp_path: Path, timeout_s: float, what: str) -> tuple[int, str, str]:
    """Wait (bounded) for the sender to exit: (exit code, stdout, stderr)."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        pytest.fail(f"the sender did not finish within {timeout_s:g} s {what}; "
                    f"its log: {(tmp_path / 'sender.log').read_text()[-2000:]}")
    return proc.returncode, out, (tmp_path / "sender.log").read_text()


def sent(proc: subprocess.Popen[str], tmp_path: Path, timeout_s: float = SEND_TIMEOUT_S) -> dict[str, Any]:
    """The sender's JSON result; fails with its log if it did not succeed."""
    rc, out, err = finish(proc, tmp_path, timeout_s, "the migration")
    assert rc == 0, f"sender exited {rc}: {err[-2000:]}"
    result: dict[str, Any] = json.loads(out)
    return result


def verify(images: Path, result: dict[str, Any], workload: Workload) -> None:
    """Every page of the stopped workload equals the last committed round, byte for byte."""
    session = images / result["session_id"]
    assert not any(p.name.startswith(".round-") for p in session.iterdir()), "a half-written round is left"
    round_dir = session / result["rounds"][-1]["directory"]
    report = verify_against_process(round_dir, workload.pid, dump_ranges(workload.pid), PAGE_SIZE)
    assert report.mismatches == 0, f"first mismatch at {report.first_mismatch:#x}"
    assert report.ok


def open_round0_bytes(images: Path) -> int:
    """Size of pages-1.img in a round 0 still being received (0 if there is none)."""
    sizes = [0]
    for pages in images.glob("*/.round-0.tmp-*/pages-1.img"):
        with contextlib.suppress(FileNotFoundError):  # committed (renamed) meanwhile
            sizes.append(pages.stat().st_size)
    return max(sizes)


def cut_mid_round0(hosts: TwoHosts, images: Path, sender: subprocess.Popen[str], side: Side) -> set[str]:
    """Wait until round 0 is well under way on the receiver, take ``side``'s veth end down, check
    the cut really fell inside round 0, and return the sender's connections that it left hanging."""
    wait_for(f"round 0 holding {CUT_AFTER_BYTES} bytes on the receiver",
             lambda: open_round0_bytes(images) > CUT_AFTER_BYTES, SEND_TIMEOUT_S,
             abort=lambda: None if sender.poll() is None else f"the sender exited ({sender.returncode})")
    hosts.set_link(up=False, side=side)
    assert not hosts.link_is_up("a")
    assert not hosts.link_is_up("b")
    assert not list(images.glob("*/round-0")), "the cut came after round 0 was committed"
    hanging = hosts.established("a", hosts.addr_b)
    assert hanging, "the sender has no connection to the receiver at the cut"
    return hanging


def half_written(images: Path) -> list[str]:
    """Open round directories anywhere under the images directory."""
    return [str(p.relative_to(images)) for p in images.glob("*/.round-*")]


def running_untraced(pid: int) -> bool:
    """Every thread of ``pid`` running or sleeping, none traced; False if the process is gone."""
    try:
        states = [procfs.read_status(tid) for tid in procfs.list_threads(pid)]
    except (ProcessGone, FileNotFoundError):
        return False
    return bool(states) and all(s.state in "RS" and s.tracer_pid == 0 for s in states)


# --- tests -------------------------------------------------------------------------------------


def test_clean_migration_across_the_veth(hosts: TwoHosts, pki: Pki, tmp_path: Path) -> None:
    workload = start_workload(size_mib=64, mutate=True)
    try:
        with receiver_in_b(hosts, pki, tmp_path) as rx:
            rx_before = hosts.rx_bytes("b")
            with sender_in_a(hosts, pki, tmp_path, workload.pid, rx.address) as sender:
                result = sent(sender, tmp_path)
            assert result["pid"] == workload.pid
            assert result["resumes"] == 0
            assert len(result["rounds"]) >= 2  # pre-copy, then the frozen round
            wire = sum(r["wire_bytes"] for r in result["rounds"])
            assert hosts.rx_bytes("b") - rx_before >= wire, "the migration did not cross the veth"
            verify(rx.images, result, workload)
            assert rx.proc.poll() is None, "the receiver died"
    finally:
        stop_process(workload.proc)


def test_link_down_mid_round0_resumes(hosts: TwoHosts, pki: Pki, tmp_path: Path) -> None:
    hosts.shape(SHAPED_RATE)
    workload = start_workload(size_mib=256, mutate=True)
    try:
        with (receiver_in_b(hosts, pki, tmp_path) as rx,
              sender_in_a(hosts, pki, tmp_path, workload.pid, rx.address, "--connect-timeout", "2") as sender):
            hanging = cut_mid_round0(hosts, rx.images, sender, side="b")
            down_at = time.monotonic()
            try:
                time.sleep(FAULT_S)  # the fault: the link stays down this long (not a synchronisation)
                # The sender hears nothing but must notice and give up the connection (a resume
                # then replaces it) rather than wait for TCP to get through again: bounded poll.
                wait_for("the sender dropping its connection across the dead link (no keepalive?)",
                         lambda: not hosts.established("a", hosts.addr_b) & hanging, DETECT_TIMEOUT_S,
                         abort=lambda: None if sender.poll() is None else f"the sender exited ({sender.returncode})",
                         log=tmp_path / "sender.log")
            finally:
                hosts.set_link(up=True, side="b")
            down_s = time.monotonic() - down_at
            result = sent(sender, tmp_path)
        assert result["resumes"] >= 1, f"no resume after the link was down {down_s:.1f} s"
        assert [r["round"] for r in result["rounds"]] == list(range(len(result["rounds"])))
        verify(rx.images, result, workload)
    finally:
        stop_process(workload.proc)


def test_link_down_beyond_resume_deadline_fails_cleanly(hosts: TwoHosts, pki: Pki, tmp_path: Path) -> None:
    hosts.shape(SHAPED_RATE)
    workload = start_workload(size_mib=128, mutate=True)
    try:
        # --idle-timeout: keepalive alone missed a dead peer now and then (grpc 1.85); the receiver's
        # own idle timeout catches it regardless.
        with (receiver_in_b(hosts, pki, tmp_path, "--resume-window", str(RESUME_WINDOW_S),
                            "--idle-timeout", "3") as rx,
              sender_in_a(hosts, pki, tmp_path, workload.pid, rx.address, "--resume-deadline",
                          str(RESUME_DEADLINE_S), "--connect-timeout", "1") as sender):
            cut_mid_round0(hosts, rx.images, sender, side="a")  # and it stays down: the source host is gone
            rc, _, err = finish(sender, tmp_path, DETECT_TIMEOUT_S + RESUME_DEADLINE_S + 10,
                                f"after the link went down for good (--resume-deadline {RESUME_DEADLINE_S:g})")
            assert rc == 5, f"exit {rc}, expected 5 (transport): {err[-2000:]}"
            errors = [line for line in err.splitlines() if line.startswith("pagehaul: error: ")]
            assert len(errors) == 1, f"expected one error line: {err[-2000:]}"
            assert "Traceback" not in err

            # The source runs on, untraced (a bounded poll: the sender has exited, the kernel may
            # still be finishing the detach).
            wait_for(f"workload {workload.pid} running and untraced", lambda: running_untraced(workload.pid), 10.0)

            # The receiver notices the dead peer by itself (the sender's abandon cannot cross the
            # link), keeps the session for its resume window, then drops the open round.
            wait_for(f"the receiver dropping the open round after its {RESUME_WINDOW_S:g} s resume window",
                     lambda: not half_written(rx.images), DETECT_TIMEOUT_S + RESUME_WINDOW_S,
                     abort=lambda: None if rx.proc.poll() is None else f"the receiver exited ({rx.proc.returncode})",
                     log=rx.log)
            assert rx.proc.poll() is None, "the receiver died"
    finally:
        stop_process(workload.proc)
