"""A small in-memory key-value server over TCP, for full-migration tests (a real network server).

    python -m tests.helpers.kv_server --port PORT --log FILE [--bind ADDR]

Single-threaded (selectors), line protocol: ``SET key value`` -> ``OK``, ``GET key`` -> ``VAL value``
or ``NONE``, ``COUNT`` -> ``N``. The data lives only in this process's memory. It listens on
0.0.0.0:PORT by default, so after a migration it serves on whatever addresses the destination host
has; ``--bind ADDR`` listens on that one address only (a service whose address moves with it). A
connection that errors (for instance one CRIU restored closed) is dropped; the server goes on.
It appends ``listening PORT pid=P`` to the log once ready.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys


def serve(port: int, log_path: str, bind: str = "0.0.0.0") -> None:  # noqa: S104 -- the test's own namespaces only
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((bind, port))
    lsock.listen(64)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    store: dict[str, str] = {}
    buffers: dict[socket.socket, bytes] = {}
    with open(log_path, "a", buffering=1) as log:
        log.write(f"listening {port}\n")
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    conn, _addr = lsock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
                buffers[conn] = b""
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                buffers.pop(conn, None)
                conn.close()
                continue
            buf = buffers[conn] + data
            *lines, buffers[conn] = buf.split(b"\n")
            out = []
            for raw in lines:
                parts = raw.decode().split(" ", 2)
                if parts[0] == "SET" and len(parts) == 3:
                    store[parts[1]] = parts[2]
                    out.append("OK")
                elif parts[0] == "GET" and len(parts) == 2:
                    out.append(f"VAL {store[parts[1]]}" if parts[1] in store else "NONE")
                elif parts[0] == "COUNT":
                    out.append(str(len(store)))
                else:
                    out.append("ERR")
            try:
                conn.sendall(("\n".join(out) + "\n").encode())
            except OSError:
                sel.unregister(conn)
                buffers.pop(conn, None)
                conn.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--bind", default="0.0.0.0")  # noqa: S104 -- the test's own namespaces only
    args = p.parse_args()
    serve(args.port, args.log, args.bind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
