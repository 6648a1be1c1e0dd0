"""Shared fixtures: a real grpc.aio receiver on 127.0.0.1:0 and live workload children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported (and so assertion-rewritten by pytest) now, at a normal stack depth: left to
# hypothesis's pytest plugin, the first import happens in pytest_terminal_summary, after the
# grpc.aio tests, where CPython 3.11's ast.parse fails with "AST constructor recursion depth
# mismatch" and turns a green run red.
import hypothesis  # noqa: F401
import pytest

from pagehaul.criu_tools import CriuTools, default_prefix
from receiver.config import ReceiverConfig
from receiver.grpc_server import Receiver
from tests.helpers.netns import TwoHosts, require_netns, two_hosts

READY_TIMEOUT_S = 120


@dataclass
class Workload:
    """A running ``pagehaul.workload`` child and what it reported."""

    proc: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def region(self, name: str) -> tuple[int, int]:
        start, size = self.info["regions"][name]
        return int(start), int(size)


def start_workload(size_mib: int = 16, mutate: bool = False, seed: int = 1) -> Workload:
    cmd = [sys.executable, "-m", "pagehaul.workload", "--size-mib", str(size_mib), "--seed", str(seed)]
    if mutate:
        cmd.append("--mutate")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the child has filled its memory
    if not line.startswith("READY "):
        stop_process(proc)
        raise RuntimeError(f"workload did not start: {line!r}")
    return Workload(proc, json.loads(line[len("READY "):]))


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Kill and reap, whatever state (running, stopped, traced) the child is in."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


@pytest.fixture
def workload() -> Iterator[Workload]:
    w = start_workload(size_mib=16, mutate=True)
    try:
        yield w
    finally:
        stop_process(w.proc)


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    r = Receiver(ReceiverConfig(images_dir=tmp_path / "images", listen="127.0.0.1:0"))
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def ci_exemption(nodeid: str) -> str | None:
    """Why a skip of this test is no gap under CI, or None (then the skip fails the run)."""
    if nodeid.startswith("tests/integration/test_deploy.py") and os.environ.get("PAGEHAUL_DOCKER_STAGE") == "passed":
        # .ci/run sets PAGEHAUL_DOCKER_STAGE=passed once .ci/docker-stage has run this test
        # with PAGEHAUL_DOCKER_TEST=1; its second, skipped, pass in scripts/test.sh is no gap.
        return "ran for real (PAGEHAUL_DOCKER_TEST=1) in this CI run's docker stage, .ci/docker-stage"
    return None


class NoSkipsUnderCI:
    """Under CI a skipped test is a failure: a green CI run has run every test (xfail aside), or
    says which skip is exempt and why (ci_exemption)."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str, str | None]] = []  # (nodeid, reason, exemption)

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        self.skips.append((report.nodeid, reason.removeprefix("Skipped: "), ci_exemption(report.nodeid)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def failing(self) -> list[tuple[str, str, str | None]]:
        return [skip for skip in self.skips if skip[2] is None]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.failing() and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skips:
            return
        failing = self.failing()
        terminalreporter.section("skips under CI", sep="=", red=bool(failing), green=not failing)
        for nodeid, reason, exemption in self.skips:
            if exemption is None:
                terminalreporter.write_line(f"FAILS THE RUN  {nodeid}: {reason}", red=True)
            else:
                terminalreporter.write_line(f"exempt  {nodeid}: {exemption} (skipped here: {reason})")
        if failing:
            terminalreporter.write_line(
                f"CI must run every test: {len(failing)} skipped (CI={os.environ['CI']!r}). Install what they need "
                "(scripts/setup.sh --criu) or exempt them, with a reason, in tests/conftest.py ci_exemption()",
                red=True)


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        config.pluginmanager.register(NoSkipsUnderCI(), "pagehaul-no-skips-under-ci")


@pytest.fixture
def criu_tools() -> CriuTools:
    """CRIU 4.2.x from the private prefix; skipped when missing, except under CI (a failure)."""
    found = CriuTools.locate()
    if found is None:
        reason = (f"CRIU tools not installed in {default_prefix()} "
                  "(run scripts/install-criu.sh, or set PAGEHAUL_CRIU_PREFIX)")
        if in_ci():
            pytest.fail(f"CI must not skip the CRIU tests: {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    """Two network namespaces joined by a veth pair (tests/helpers/netns.py); skipped where they
    cannot be made, except under CI."""
    require_netns()
    with two_hosts() as h:
        yield h
