"""Real servers nobody here wrote, moved by ``pagehaul migrate`` while clients load them.

Redis 7 (Debian's, installed by ``scripts/setup.sh --servers``) holds 100k keys written through
``redis-cli --pipe`` and is kept busy by ``redis-benchmark`` while pre-copy runs. It is moved back
and forth between the two hosts; after each move every restored page equals CRIU's own dump of the
same frozen instant (``test_signal_migration.restored_equals_criu_dump``), the server answers on
the destination's address and every key still holds its value, and it takes new writes.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from pagehaul.criu_tools import CriuTools
from tests.conftest import stop_process
from tests.helpers.netns import Side, TwoHosts
from tests.integration.test_full_migration import (
    alive,
    in_ns,
    in_pidns,
    kill_restored,
    migrate_ok,
    receiver_in_b,
    wait_for,
)
from tests.integration.test_signal_migration import assert_restored_is_criu_instant

pytestmark = pytest.mark.criu

REDIS_PORT = 6390
KEYS = 100_000
MOVES = 2


def redis_cli(hosts: TwoHosts, side: Side, *args: str, stdin: str | None = None) -> str:
    addr = hosts.addr_a if side == "a" else hosts.addr_b
    proc = subprocess.run(in_ns(hosts, side, ["redis-cli", "-h", addr, "-p", str(REDIS_PORT), *args]),
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def answers(hosts: TwoHosts, side: Side) -> bool:
    addr = hosts.addr_a if side == "a" else hosts.addr_b
    proc = subprocess.run(in_ns(hosts, side, ["redis-cli", "-h", addr, "-p", str(REDIS_PORT), "PING"]),
                          capture_output=True, text=True, timeout=10, check=False)
    return proc.stdout.strip() == "PONG"


def value(i: int) -> str:
    return f"v{i}-" + "x" * (i % 200)


@pytest.fixture(scope="module")
def redis_server() -> str:
    path = shutil.which("redis-server")
    assert path is not None, "redis-server is not installed: run scripts/setup.sh --servers"
    return path


def test_redis_under_load_moves_back_and_forth_with_its_data(hosts: TwoHosts, tmp_path: Path, criu_tools: CriuTools,
                                                             redis_server: str) -> None:
    # Every address of whichever host it runs on (the address moves with the host here).
    argv = [redis_server, "--port", str(REDIS_PORT), "--bind", "0.0.0.0",  # noqa: S104
            "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--logfile", str(tmp_path / "redis.log")]
    with in_pidns(hosts, argv) as first:
        pid = first
        side: Side = "a"
        wait_for("redis to answer", lambda: answers(hosts, "a"))
        pipe = "".join(f"SET k{i} {value(i)}\r\n" for i in range(KEYS))
        out = redis_cli(hosts, "a", "--pipe", stdin=pipe)
        assert "errors: 0" in out, out
        try:
            for move in range(MOVES):
                dest: Side = "b" if side == "a" else "a"
                addr = hosts.addr_a if side == "a" else hosts.addr_b
                load = subprocess.Popen(in_ns(hosts, side, ["redis-benchmark", "-h", addr, "-p", str(REDIS_PORT),
                                                            "-t", "set,get,incr,lpush", "-r", "100000", "-n",
                                                            "100000000", "-c", "8", "-q"]),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, text=True)
                try:
                    work = tmp_path / f"move-{move}"
                    work.mkdir()
                    with receiver_in_b(hosts, work, "--restore", "--criu", str(criu_tools.criu),
                                       side=dest) as address:
                        result = migrate_ok(hosts, work, pid, address, criu_tools, "--keep-dump", "--tcp-close",
                                            side=side)
                finally:
                    stop_process(load)
                restored = result["restored_pid"]
                wait_for("the source to be gone", lambda p=pid: not alive(p), 10)  # type: ignore[misc]
                assert_restored_is_criu_instant(result, criu_tools, f"move {move + 1}")
                pid, side = restored, dest
                wait_for("redis to answer on the destination", lambda s=side: answers(hosts, s))  # type: ignore[misc]
                assert int(redis_cli(hosts, side, "DBSIZE")) >= KEYS
                for i in random.sample(range(KEYS), 200):
                    assert redis_cli(hosts, side, "GET", f"k{i}") == value(i), f"move {move + 1}: key k{i}"
                assert redis_cli(hosts, side, "SET", f"after-move-{move}", "ok") == "OK"
                assert redis_cli(hosts, side, "GET", f"after-move-{move}") == "ok"
                assert alive(pid)
        finally:
            if pid != first:
                kill_restored(pid)
