"""Load for the key-value server: one client connection, reconnecting when it breaks.

    python -m tests.helpers.kv_client --addresses A1,A2 --port PORT --name C

Keeps one connection open and loops: ``SET C-i value-i-n`` then ``GET`` it back, remembering what
it stored. When the connection breaks (the server froze and moved), it reconnects to the first of
``--addresses`` that accepts, GETs back every key it ever stored and checks each value, then goes
on. It prints ``connected ADDR``, ``ops N`` every 100 operations, ``verified N keys after
reconnect`` and, on SIGTERM, ``done
ops=N reconnects=R``, exiting 0; any wrong or missing value prints ``LOST …`` and exits 3.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

TIMEOUT_S = 5.0


class Lost(Exception):
    pass


def _connect(addresses: list[str], port: int) -> tuple[socket.socket, str]:
    deadline = time.monotonic() + 120.0
    while True:
        for addr in addresses:
            try:
                s = socket.create_connection((addr, port), timeout=TIMEOUT_S)
            except OSError:
                continue
            s.settimeout(TIMEOUT_S)
            return s, addr
        if time.monotonic() > deadline:
            raise OSError("no address accepts connections")
        time.sleep(0.05)  # retry pacing while the server is down


def _ask(s: socket.socket, f: object, line: str) -> str:
    s.sendall((line + "\n").encode())
    reply = f.readline()  # type: ignore[attr-defined]
    if not reply:
        raise OSError("connection closed")
    return str(reply).rstrip("\n")


def _set_and_get(s: socket.socket, f: object, key: str, value: str) -> None:
    if _ask(s, f, f"SET {key} {value}") != "OK":
        raise Lost(f"SET {key} not OK")
    got = _ask(s, f, f"GET {key}")
    if got != f"VAL {value}":
        raise Lost(f"GET {key} -> {got!r}, expected {value!r}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--addresses", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    addresses = args.addresses.split(",")
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    stored: dict[str, str] = {}
    pending: tuple[str, str | None, str] | None = None
    ops = reconnects = 0
    s, addr = _connect(addresses, args.port)
    f = s.makefile("r")
    print(f"connected {addr}", flush=True)
    i = 0
    while not stop:
        key, value = f"{args.name}-{i % 500}", f"v{i}-{args.name}"
        # In flight when the connection breaks: the server may or may not have applied it.
        pending = (key, stored.get(key), value)
        try:
            _set_and_get(s, f, key, value)
            stored[key] = value
            pending = None
            ops += 1
            i += 1
            if ops % 100 == 0:
                print(f"ops {ops}", flush=True)
        except Lost as err:
            print(f"LOST {err}", flush=True)
            return 3
        except OSError:
            if stop:
                break
            s.close()
            s, addr = _connect(addresses, args.port)
            f = s.makefile("r")
            reconnects += 1
            print(f"connected {addr}", flush=True)
            for key, value in stored.items():
                try:
                    got = _ask(s, f, f"GET {key}")
                except OSError:
                    break  # broke again: the next reconnect checks everything again
                if pending is not None and key == pending[0] and got == f"VAL {pending[2]}":
                    continue  # the interrupted SET had been applied
                if got != f"VAL {value}":
                    print(f"LOST {key} -> {got!r}, expected {value!r}", flush=True)
                    return 3
            else:
                print(f"verified {len(stored)} keys after reconnect", flush=True)
    print(f"done ops={ops} reconnects={reconnects}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
