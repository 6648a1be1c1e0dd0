"""Before freezing anything: can this tree be migrated, and if not, what must the user change?

``pagehaul migrate`` runs these checks before its first round (a problem stops it with every
problem named and the source untouched); ``pagehaul migrate --check`` prints all of them and
migrates nothing, as ``criu check`` and P.Haul's checks do. Each check names what it found and,
for a problem, the fix. What the checks know, and from where:

* **An unprivileged task whose /proc is not its own.** CRIU's parasite opens ``/proc`` inside the
  task; when ``/proc/self`` there is not the task itself (the host's /proc seen from a PID
  namespace), it mounts a proc of its own, which needs CAP_SYS_ADMIN (criu/pie/parasite.c,
  ``get_proc_fd``): "can't dump unprivileged task whose /proc doesn't belong to it".
* **SysV shared memory of an IPC namespace the tree does not own.** CRIU dumps SysV segments with
  the tree's IPC namespace only; attached segments of the host's namespace (pagehaul's own) would
  not be restored.
* **Established TCP connections** make ``criu dump`` fail unless they are dumped closed
  (``--tcp-close``; peers reconnect) or kept (CRIU's ``--tcp-established``): kept, each one's local
  address must be on the destination when criu restore binds it, so with ``--move-address`` it
  must be one of the moved addresses (or loopback, both ends in the tree); with a bare
  ``--criu-opt=--tcp-established`` the user moves the addresses (a note).
* **Moved addresses** (``--move-address``): each is on exactly one interface here, and removing
  it takes no other address along; the tree shares pagehaul's network namespace (otherwise CRIU
  dumps the namespace itself, and the address moved here is not the tree's).
* **The session leader outside the tree's PID namespace, or a terminal**: CRIU restores neither
  without ``--shell-job``.
* **Listening sockets bound to one address**: that address must exist on the destination (a note:
  it cannot be checked from here), unless it is a moved address.
* **Room for CRIU's local dump**: it copies memory into the dump directory (tmpfs by default): all
  of it with ``--full-dump``, shared memory only with a lazy dump.
* **The receiver**: reachable, and with TLS, a certificate that names the address given to
  ``--to`` (``pagehaul certs --name HOST``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pagehaul import netaddr, procfs
from pagehaul.errors import ProcessGone
from pagehaul.security import Security

Severity = Literal["ok", "note", "problem"]

CAP_SYS_ADMIN: Final = 21
TCP_ESTABLISHED: Final = "01"  # include/net/tcp_states.h, as /proc/net/tcp prints st
TCP_LISTEN: Final = "0A"
_TTY_PREFIXES: Final = ("/dev/pts/", "/dev/tty", "/dev/console")


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    severity: Severity
    detail: str

    def line(self) -> str:
        return f"{self.check}: {self.detail}"


def _status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _same_link(a: str, b: str) -> bool:
    try:
        return os.readlink(a) == os.readlink(b)
    except OSError:
        return False


def _own_proc(pid: int, vpid: int) -> bool:
    """Does ``/proc`` in the task's root show the task itself at its own pid (CRIU's fast path)?"""
    return _same_link(f"/proc/{pid}/root/proc/{vpid}/ns/pid", f"/proc/{pid}/ns/pid") and \
        _same_link(f"/proc/{pid}/root/proc/{vpid}/ns/mnt", f"/proc/{pid}/ns/mnt")


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def _tty_fds(pid: int) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(_TTY_PREFIXES):
                    out.append(target)
    return out


def _hex_address(text: str) -> str:
    """An address of /proc/net/tcp{,6} (host-order 32-bit words in hex) as a string."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _tcp_sockets(pid: int, inodes: set[int]) -> list[tuple[str, str, int]]:
    """(state, local address, port) of the TCP sockets among ``inodes``, from the task's netns."""
    out = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and int(fields[9]) in inodes:
                    addr, port = fields[1].split(":")
                    out.append((fields[3], _hex_address(addr), int(port, 16)))
    return out


def _is_wildcard_or_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_unspecified or ip.is_loopback


def _tcp_finding(name: str, state: str, addr: str, port: int, *, tcp_close: bool, tcp_established: bool,
                 moved: frozenset[ipaddress.IPv4Address]) -> Finding | None:
    """What one TCP socket of the tree needs (module doc), or None when nothing."""
    ip = ipaddress.ip_address(addr)
    if state == TCP_ESTABLISHED and not tcp_close:
        if not tcp_established:
            return Finding("tcp", "problem", (
                f"{name} has an established TCP connection on {addr}:{port}; pass --tcp-close (dumped closed, peers "
                "reconnect) or --move-address ADDR (the address moves with the tree, connections are kept)"))
        if ip.is_loopback or ip in moved:
            return None
        if moved:
            return Finding("tcp", "problem", (
                f"{name} has an established TCP connection from {addr}:{port}, an address that does not move: criu "
                f"restore could not bind it on the destination; move it too (--move-address {addr}) or pass "
                "--tcp-close"))
        return Finding("tcp", "note", (
            f"{name}: the connection on {addr}:{port} is kept (--tcp-established): {addr} must leave this host "
            "at the frozen point and be on the destination before criu restore (--move-address does both)"))
    if state == TCP_LISTEN and not _is_wildcard_or_loopback(addr) and ip not in moved:
        return Finding("listen", "note", (
            f"{name} listens on {addr}:{port}: that address must exist on the destination, or the restore fails"))
    return None


def check_tree(pids: Sequence[int], *, tcp_close: bool, shell_job: bool, dump_parent: Path,
               lazy: bool = False, tcp_established: bool = False,
               moved: frozenset[ipaddress.IPv4Address] = frozenset()) -> list[Finding]:
    """What CRIU will refuse or lose in the tree ``pids`` (module doc). ``lazy``: CRIU's dump will
    leave private anonymous memory in the source, so only shared memory needs room locally.
    ``tcp_established``: connections are kept; ``moved``: the addresses that move with the tree."""
    findings: list[Finding] = []
    tree = set(pids)
    host_ipc = os.readlink("/proc/self/ns/ipc")  # pagehaul runs in the host's namespaces
    memory = 0
    for pid in pids:
        try:
            status = _status_fields(pid)
            vpid = procfs.read_vpid(pid)
            maps = procfs.read_maps(pid)
        except (OSError, ProcessGone):
            continue  # exited meanwhile: nothing of it to dump
        name = f"process {pid} ({status.get('Name', '?')})"
        uids = {int(u) for u in status.get("Uid", "0").split()}
        cap_eff = int(status.get("CapEff", "0"), 16)
        if uids != {0} and not cap_eff & (1 << CAP_SYS_ADMIN) and not _own_proc(pid, vpid):
            findings.append(Finding("privileges", "problem", (
                f"{name} runs as uid {max(uids)} and sees a /proc that is not its own: criu cannot dump it "
                "(\"can't dump unprivileged task whose /proc doesn't belong to it\"); start the tree in its own PID "
                "and mount namespaces with a fresh /proc (e.g. unshare --pid --fork --mount-proc)")))
        if any(m.path.startswith("/SYSV") for m in maps) and os.readlink(f"/proc/{pid}/ns/ipc") == host_ipc:
            findings.append(Finding("ipc", "problem", (
                f"{name} uses SysV shared memory of the host's IPC namespace, which criu does not migrate; "
                "run the tree in an IPC namespace of its own (unshare --ipc)")))
        nssid = [int(x) for x in status.get("NSsid", "").split()]
        if not shell_job and nssid and nssid[-1] == 0:
            findings.append(Finding("session", "problem", (
                f"{name}: its session leader is outside its PID namespace; start the tree's session leader "
                "inside it (unshare --pid --fork setsid ...) or pass --shell-job")))
        elif not shell_job and nssid and nssid[0] not in tree:
            findings.append(Finding("session", "problem", (
                f"{name}: its session leader (pid {nssid[0]}) is not part of the tree; start the tree with setsid "
                "or pass --shell-job")))
        ttys = _tty_fds(pid)
        if ttys and not shell_job:
            findings.append(Finding("terminal", "problem", (
                f"{name} has a terminal open ({ttys[0]}); pass --shell-job, or start it without one "
                "(setsid, redirected input and output)")))
        for state, addr, port in _tcp_sockets(pid, _socket_inodes(pid)):
            found = _tcp_finding(name, state, addr, port, tcp_close=tcp_close, tcp_established=tcp_established,
                                 moved=moved)
            if found is not None:
                findings.append(found)
        if not lazy:
            memory += int(status.get("RssAnon", "0 kB").split()[0]) * 1024
        memory += int(status.get("RssShmem", "0 kB").split()[0]) * 1024
    st = os.statvfs(dump_parent)
    free = st.f_bavail * st.f_frsize
    if free < memory:
        findings.append(Finding("dump space", "problem", (
            f"criu's local dump needs about {memory >> 20} MiB in {dump_parent}, which has {free >> 20} MiB "
            "free; give --dump-dir on a larger filesystem (tmpfs keeps it fast)")))
    if not any(f.severity == "problem" for f in findings):
        findings.append(Finding("tree", "ok", f"{len(pids)} process(es), about {memory >> 20} MiB to dump locally "
                                              f"({free >> 20} MiB free in {dump_parent})"))
    return findings


def check_addresses(pid: int, wanted: Sequence[netaddr.Wanted]) -> list[Finding]:
    """Can every ``--move-address`` be taken off this host at the frozen point (module doc)?"""
    if not wanted:
        return []
    try:
        same_netns = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return []  # exited: the tree check says so
    if not same_netns:
        return [Finding("address", "problem", (
            f"process {pid} is in another network namespace than pagehaul: run pagehaul migrate in it "
            f"(nsenter --net=/proc/{pid}/ns/net ...) so that --move-address moves the address the tree uses"))]
    try:
        here = netaddr.addresses()
    except netaddr.AddressError as err:
        return [Finding("address", "problem", str(err))]
    out = []
    for w in wanted:
        why = netaddr.problems(w, here)
        if why:
            out += [Finding("address", "problem", f"--move-address {w}: {line}") for line in why]
            continue
        held = next(h for h in here if h.address == w.address)
        out.append(Finding("address", "ok", (
            f"{held.interface.with_prefixlen} on {held.device}: removed here at the frozen point, added to the "
            "destination's --service-device before criu restore (given back here if the migration fails)")))
    return out


def _tls_handshake(host: str, port: int, security: Security, timeout_s: float) -> None:
    assert security.tls is not None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(security.tls.ca))
    ctx.load_cert_chain(str(security.tls.cert), str(security.tls.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout_s) as raw, \
            ctx.wrap_socket(raw, server_hostname=host):
        pass


async def check_receiver(target: str, security: Security, timeout_s: float) -> Finding:
    """Reachable, and with TLS, a certificate that names ``target``'s host."""
    host, _, port_text = target.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return Finding("receiver", "problem", f"--to {target}: expected HOST:PORT")
    try:
        if security.tls is None:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        else:
            await asyncio.to_thread(_tls_handshake, host, port, security, timeout_s)
    except ssl.SSLCertVerificationError as err:
        if "mismatch" in str(err.verify_message or err):
            return Finding("receiver", "problem", (
                f"the receiver's certificate does not name {host}: make it with pagehaul certs --name {host} "
                "(or use the name it has in --to)"))
        return Finding("receiver", "problem", f"the receiver's certificate is not trusted: {err.verify_message}")
    except (OSError, TimeoutError, ssl.SSLError) as err:
        return Finding("receiver", "problem", f"cannot reach the receiver at {target}: {err or type(err).__name__}")
    return Finding("receiver", "ok", f"{target} reachable" + (", certificate names it" if security.tls else ""))


def problems(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "problem"]
