"""The service's IPv4 address moves with the tree, and its TCP connections with it.

``pagehaul migrate --move-address ADDR`` on the source, ``pagehaul receive --restore
--service-device DEV`` on the destination; CRIU dumps and restores the connections themselves
(``--tcp-established``). This module does the address and ARP part, with ``ip`` from iproute2:

**Source, at the frozen point, right before criu dump** (:func:`release`): every moved address is
removed from the interface that holds it. That is the network lock CRIU would otherwise take
with iptables or nftables (so criu dump runs with ``--network-lock=skip``): a segment for an
address this host no longer owns is never delivered to a local socket (the local route went
with the address), so a dumped socket takes in and acknowledges nothing after CRIU has read its
queues; nor is it answered with a reset, and the source's own sockets send nothing from an
address the host does not own (no route from it). With IP forwarding off such a segment is
dropped as an address error; with forwarding on, a segment of a connection whose socket still
exists is dropped as well (early demux has attached that socket, and ``ip_forward`` drops what
carries one). The clients retransmit; once the destination has the address and has said so,
the retransmissions reach it. If anything fails before the destination runs the tree,
:meth:`Released.give_back` puts every address back as it was (device, prefix, label, scope,
broadcast) and announces it again.

**Destination, around criu restore** (:func:`take`): CRIU binds the restored sockets to the
address, so it must be there first (without it: "Can't bind inet socket ... Cannot assign
requested address"). But until the sockets exist, a segment for the address reaching this host
would be answered with a reset, which ends the client's connection; and criu restore creates
them only after it has restored memory, which takes time. So while criu restores, the device
answers no ARP (``arp_ignore`` 8) and nobody learns that this host has the address. Afterwards
ARP is answered again and a gratuitous ARP (one request and one reply, sender and target both
the address, as the kernel's own and ``arping -U`` send) tells every host on the segment its new
MAC: their neighbour entries still point at the source, whose traffic for the address now goes
nowhere, and would otherwise only be re-learnt when they expire (tens of seconds). On failure
the addresses are removed again, so that the source can take them back.

What the user arranges: both hosts on one L2 segment for the address (or routes that lead to
whichever host has it), the address used nowhere else. IPv4 only: IPv6 would need unsolicited
neighbour advertisements and has duplicate address detection to reckon with.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pagehaul.errors import ConfigError, PagehaulError

log = logging.getLogger(__name__)

IP_TIMEOUT_S: Final = 10.0
ETH_P_ARP: Final = 0x0806
ETH_P_IP: Final = 0x0800
ARPHRD_ETHER: Final = 1
ARPOP_REQUEST: Final = 1
ARPOP_REPLY: Final = 2
BROADCAST_MAC: Final = b"\xff" * 6
# Documentation/networking/ip-sysctl.rst, arp_ignore: "8 - do not reply for all local addresses".
ARP_IGNORE_ALL: Final = 8


class AddressError(PagehaulError):
    """An address cannot be moved as asked (missing here, already there, ``ip`` refused)."""


@dataclass(frozen=True, slots=True)
class Wanted:
    """A ``--move-address`` value: the address, and the prefix length if the user gave one."""

    address: ipaddress.IPv4Address
    prefixlen: int | None = None

    def __str__(self) -> str:
        return str(self.address) if self.prefixlen is None else f"{self.address}/{self.prefixlen}"


def parse_wanted(value: str) -> Wanted:
    """``ADDR`` or ``ADDR/PREFIX`` (IPv4)."""
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as err:
        raise ConfigError(f"--move-address {value!r}: not an IPv4 address (ADDR or ADDR/PREFIX)") from err
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise ConfigError(f"--move-address {value}: only IPv4 addresses can be moved")
    if iface.ip.is_loopback or iface.ip.is_unspecified or iface.ip.is_multicast:
        raise ConfigError(f"--move-address {value}: not an address a service can move with")
    return Wanted(iface.ip, iface.network.prefixlen if "/" in value else None)


@dataclass(frozen=True, slots=True)
class HostAddress:
    """One IPv4 address of an interface, with what ``ip addr add`` needs to put it back as it was."""

    interface: ipaddress.IPv4Interface
    device: str
    label: str = ""
    scope: str = "global"
    broadcast: str = ""
    secondary: bool = False
    noprefixroute: bool = False

    @property
    def address(self) -> ipaddress.IPv4Address:
        return self.interface.ip

    def add_argv(self) -> list[str]:
        argv = ["addr", "add", self.interface.with_prefixlen, "dev", self.device, "scope", self.scope]
        if self.broadcast:
            argv += ["broadcast", self.broadcast]
        if self.label and self.label != self.device:
            argv += ["label", self.label]
        if self.noprefixroute:
            argv.append("noprefixroute")
        return argv


def _ip(*args: str) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AddressError(f"cannot run ip {' '.join(args)}: {err}") from err
    if proc.returncode != 0:
        raise AddressError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc.stdout


def addresses() -> list[HostAddress]:
    """Every IPv4 address of this network namespace (``ip -j -4 addr show``)."""
    links: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "addr", "show") or "[]")
    out = []
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("family") != "inet" or "local" not in info:
                continue
            out.append(HostAddress(
                ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}"), str(link["ifname"]),
                label=str(info.get("label", "")), scope=str(info.get("scope", "global")),
                broadcast=str(info.get("broadcast", "")), secondary=bool(info.get("secondary", False)),
                noprefixroute=bool(info.get("noprefixroute", False))))
    return out


def promote_secondaries(device: str) -> bool:
    try:
        with open(f"/proc/sys/net/ipv4/conf/{_plain(device)}/promote_secondaries") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def problems(wanted: Wanted, here: Sequence[HostAddress]) -> list[str]:
    """Why ``wanted`` cannot be released from this host as it stands (empty: it can)."""
    holders = [h for h in here if h.address == wanted.address]
    if not holders:
        return [f"{wanted.address} is not an address of this host (ip -4 addr shows every address)"]
    if len(holders) > 1:
        return [f"{wanted.address} is on {len(holders)} interfaces here ({', '.join(h.device for h in holders)}); "
                "it must be on one"]
    held = holders[0]
    out = []
    if wanted.prefixlen is not None and wanted.prefixlen != held.interface.network.prefixlen:
        out.append(f"{wanted} was asked for, but this host has {held.interface.with_prefixlen} on {held.device}")
    if not held.secondary and not promote_secondaries(held.device):
        # Removing a primary address removes the secondaries of its subnet with it (devinet.c).
        others = [h for h in here if h.device == held.device and h.secondary
                  and h.interface.network == held.interface.network]
        if others:
            out.append(f"{held.interface.with_prefixlen} is the primary address of its subnet on {held.device}; "
                       f"removing it would remove {', '.join(str(h.address) for h in others)} too "
                       f"(set net.ipv4.conf.{held.device}.promote_secondaries=1, or make it a secondary address)")
    return out


class Released:
    """Addresses taken off this host at the frozen point; :meth:`give_back` restores them."""

    def __init__(self, held: Sequence[HostAddress]) -> None:
        self.held = tuple(held)
        self._given_back = False

    def give_back(self) -> None:
        """Add every address back as it was and announce it (the source goes on serving). Each
        one is tried even if another fails; the failures are logged and raised at the end."""
        if self._given_back:
            return
        self._given_back = True
        failed = []
        for h in self.held:
            try:
                _ip(*h.add_argv())
                announce(h.address, h.device)
                log.info("address %s given back to %s", h.interface.with_prefixlen, h.device)
            except (PagehaulError, OSError) as err:
                log.warning("could not give %s back to %s: %s", h.interface.with_prefixlen, h.device, err)
                failed.append(f"{h.interface.with_prefixlen} on {h.device}: {err}")
        if failed:
            raise AddressError("could not give the moved addresses back: " + "; ".join(failed))


def release(wanted: Sequence[Wanted]) -> Released:
    """Remove every wanted address from the interface that holds it (the frozen point's network
    lock, module doc). All or none: if one cannot be removed, those already removed go back."""
    here = addresses()
    found = []
    for w in wanted:
        why = problems(w, here)
        if why:
            raise AddressError("; ".join(why))
        found.append(next(h for h in here if h.address == w.address))
    done: list[HostAddress] = []
    try:
        for h in found:
            _ip("addr", "del", h.interface.with_prefixlen, "dev", h.device)
            done.append(h)
            log.info("address %s removed from %s", h.interface.with_prefixlen, h.device)
    except BaseException:
        with contextlib.suppress(AddressError):
            Released(done).give_back()
        raise
    return Released(found)


def check_takeable(interfaces: Sequence[ipaddress.IPv4Interface], device: str) -> None:
    """The destination's checks before anything is restored: the device exists, none of the
    addresses is already in use here."""
    # /proc/sys/net is this network namespace's (/sys is the one it was mounted in).
    if not os.path.isdir(f"/proc/sys/net/ipv4/conf/{_plain(device)}"):
        raise AddressError(f"service device {device!r} does not exist here (or has no IPv4)")
    present = {h.address: h.device for h in addresses()}
    clash = [f"{i.ip} (on {present[i.ip]})" for i in interfaces if i.ip in present]
    if clash:
        raise AddressError(f"address already on this host: {', '.join(clash)}; it must be used nowhere but the "
                           "source")


@contextlib.contextmanager
def take(interfaces: Sequence[ipaddress.IPv4Interface], device: str) -> Iterator[None]:
    """Add the addresses to ``device`` unannounced for the ``with`` block (criu restore), then
    answer ARP for them again and announce them; if the block fails, remove them (module doc).
    No addresses: nothing to do."""
    if not interfaces:
        yield
        return
    check_takeable(interfaces, device)
    quiet = _ArpIgnore(device)
    added: list[HostAddress] = []
    ok = False
    try:
        quiet.set(ARP_IGNORE_ALL)
        for iface in interfaces:
            h = HostAddress(iface, device)
            _ip(*h.add_argv())
            added.append(h)
            log.info("address %s added to %s (not announced while criu restores)", iface.with_prefixlen, device)
        yield
        ok = True
    finally:
        if not ok:
            for h in added:
                try:
                    _ip("addr", "del", h.interface.with_prefixlen, "dev", h.device)
                except AddressError as err:
                    log.warning("could not remove %s from %s after the failed restore: %s", h.interface, device, err)
        quiet.restore()
    for iface in interfaces:
        announce(iface.ip, device)


class _ArpIgnore:
    """``net.ipv4.conf.DEV.arp_ignore`` of this network namespace, set and put back."""

    def __init__(self, device: str) -> None:
        self.path = f"/proc/sys/net/ipv4/conf/{_plain(device)}/arp_ignore"
        self.old: str | None = None

    def set(self, value: int) -> None:
        try:
            with open(self.path) as f:
                self.old = f.read().strip()
            with open(self.path, "w") as f:
                f.write(str(value))
        except OSError as err:
            raise AddressError(f"cannot set {self.path}: {err.strerror}") from err

    def restore(self) -> None:
        if self.old is None:
            return
        try:
            with open(self.path, "w") as f:
                f.write(self.old)
        except OSError as err:
            log.warning("could not put %s back to %s: %s", self.path, self.old, err.strerror)
        self.old = None


def _plain(device: str) -> str:
    if not device or "/" in device or device in (".", "..") or len(device) > 15:
        raise ConfigError(f"{device!r} is not a network device name")
    return device


def garp_frames(address: ipaddress.IPv4Address, mac: bytes) -> list[bytes]:
    """Gratuitous ARP for ``address`` at ``mac``: a request (target hardware address zero, as the
    kernel's own) and a reply (target hardware address = sender's, which the kernel requires of a
    gratuitous reply: net/ipv4/arp.c, arp_is_garp), both broadcast."""
    ip = address.packed
    eth = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    frames = []
    for op, tha in ((ARPOP_REQUEST, b"\0" * 6), (ARPOP_REPLY, mac)):
        arp = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, op) + mac + ip + tha + ip
        frames.append(eth + arp)
    return frames


def announce(address: ipaddress.IPv4Address, device: str) -> None:
    """Send gratuitous ARP for ``address`` out of ``device`` (raw AF_PACKET frames). Hosts that
    have a neighbour entry for the address update it to this host's MAC (arp_process overrides an
    entry's lock time for a gratuitous ARP); none is created where there was none."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sk:
        sk.bind((_plain(device), ETH_P_ARP))
        _, _, _, hatype, mac = sk.getsockname()
        if hatype != ARPHRD_ETHER or len(mac) != 6:
            log.info("%s has no Ethernet address: no gratuitous ARP for %s", device, address)
            return
        for frame in garp_frames(address, mac):
            sk.send(frame)
    log.info("gratuitous ARP sent for %s from %s (%s)", address, device, mac.hex(":"))
