"""A client that holds one TCP connection for its whole life and never reconnects.

    python -m tests.helpers.held_client --address ADDR --port PORT --name C [--protocol kv|redis]

It connects once, prints ``local ADDR:PORT`` (its own end, so a test can find the very same
connection in the server host's socket table), then loops on that one socket: ``SET C-i value``,
``GET`` it back, check the value. Protocol ``kv`` is tests/helpers/kv_server.py's line protocol,
``redis`` is RESP as Redis speaks it. It prints ``ops N`` every 50 operations; any error on the
socket (a reset, a close, a timeout) prints ``BROKEN …`` and exits 4, a wrong answer prints
``LOST …`` and exits 3; on SIGTERM it prints ``done ops=N slowest=S`` (the longest operation, in
seconds) and exits 0. The socket timeout is long: a request in flight while the server moves
waits for TCP's retransmissions to reach the new host.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from typing import BinaryIO

TIMEOUT_S = 60.0
REPORT_EVERY = 50
PACE_S = 0.005  # between operations: pacing, so that the clients leave the CPU to the migration


class Lost(Exception):
    pass


def _kv(sock: socket.socket, f: BinaryIO, key: str, value: str) -> None:
    sock.sendall(f"SET {key} {value}\nGET {key}\n".encode())
    for want in ("OK", f"VAL {value}"):
        got = f.readline()
        if not got:
            raise ConnectionError("closed by the server")
        if got.decode().rstrip("\n") != want:
            raise Lost(f"{key}: {got!r}, expected {want!r}")


def _resp(*words: str) -> bytes:
    return f"*{len(words)}\r\n".encode() + b"".join(f"${len(w)}\r\n{w}\r\n".encode() for w in words)


def _redis(sock: socket.socket, f: BinaryIO, key: str, value: str) -> None:
    sock.sendall(_resp("SET", key, value) + _resp("GET", key))
    status = f.readline()
    header = f.readline()
    body = f.readline() if header.startswith(b"$") and header != b"$-1\r\n" else b""
    if not status or not header:
        raise ConnectionError("closed by the server")
    if status != b"+OK\r\n" or body != f"{value}\r\n".encode():
        raise Lost(f"{key}: {status!r} {header!r} {body!r}, expected {value!r}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--protocol", choices=("kv", "redis"), default="kv")
    args = p.parse_args()
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    ask = _kv if args.protocol == "kv" else _redis
    sock = socket.create_connection((args.address, args.port), timeout=TIMEOUT_S)
    f = sock.makefile("rb")
    host, port = sock.getsockname()[:2]
    print(f"local {host}:{port}", flush=True)
    ops = 0
    slowest = 0.0
    while not stop:
        started = time.monotonic()
        try:
            ask(sock, f, f"{args.name}-{ops % 500}", f"v{ops}-{args.name}")
        except Lost as err:
            print(f"LOST {err}", flush=True)
            return 3
        except OSError as err:
            if stop:
                break  # SIGTERM interrupted a wait: not the connection's fault
            print(f"BROKEN {err!r} after {ops} ops", flush=True)
            return 4
        slowest = max(slowest, time.monotonic() - started)
        ops += 1
        if ops % REPORT_EVERY == 0:
            print(f"ops {ops}", flush=True)
        time.sleep(PACE_S)
    print(f"done ops={ops} slowest={slowest:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
