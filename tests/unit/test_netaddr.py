"""The address bookkeeping of ``pagehaul.netaddr`` that needs no network: what ``--move-address``
accepts, what is refused before anything is removed, how an address is put back, and the bytes
of the gratuitous ARP (checked field by field against the ARP header layout)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from pagehaul import netaddr
from pagehaul.errors import ConfigError
from pagehaul.netaddr import HostAddress, Wanted

MAC = bytes.fromhex("02aabbccddee")


def _host(cidr: str, device: str = "eth0", **kw: object) -> HostAddress:
    return HostAddress(ipaddress.IPv4Interface(cidr), device, **kw)  # type: ignore[arg-type]


def test_move_address_values() -> None:
    assert netaddr.parse_wanted("10.0.0.5") == Wanted(ipaddress.IPv4Address("10.0.0.5"), None)
    assert netaddr.parse_wanted("10.0.0.5/24") == Wanted(ipaddress.IPv4Address("10.0.0.5"), 24)
    assert str(netaddr.parse_wanted("10.0.0.5/24")) == "10.0.0.5/24"
    for bad, why in (("fd00::5", "only IPv4"), ("10.0.0.300", "not an IPv4 address"), ("127.0.0.1", "not an address"),
                     ("0.0.0.0", "not an address"), ("eth0", "not an IPv4 address")):  # noqa: S104
        with pytest.raises(ConfigError, match=why):
            netaddr.parse_wanted(bad)


def test_an_address_is_refused_before_anything_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netaddr, "promote_secondaries", lambda device: False)
    here = [_host("10.0.0.1/24"), _host("10.0.0.5/24", secondary=True), _host("192.168.1.1/24", "eth1"),
            _host("172.16.0.9/32", "eth1"), _host("172.16.0.9/32", "eth2")]
    assert netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.5")), here) == []
    assert netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.5"), 24), here) == []
    assert "is not an address of this host" in netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.6")), here)[0]
    assert "was asked for, but this host has 10.0.0.5/24 on eth0" in \
        netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.5"), 16), here)[0]
    assert "is on 2 interfaces here (eth1, eth2)" in \
        netaddr.problems(Wanted(ipaddress.IPv4Address("172.16.0.9")), here)[0]
    # The primary address of a subnet takes its secondaries along when removed...
    [why] = netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.1")), here)
    assert "removing it would remove 10.0.0.5 too" in why
    assert "promote_secondaries" in why
    # ...unless the kernel promotes a secondary; a primary alone in its subnet is no problem.
    assert netaddr.problems(Wanted(ipaddress.IPv4Address("192.168.1.1")), here) == []
    monkeypatch.setattr(netaddr, "promote_secondaries", lambda device: True)
    assert netaddr.problems(Wanted(ipaddress.IPv4Address("10.0.0.1")), here) == []


def test_an_address_goes_back_as_it_was() -> None:
    assert _host("10.0.0.5/24").add_argv() == ["addr", "add", "10.0.0.5/24", "dev", "eth0", "scope", "global"]
    assert _host("10.0.0.5/24", label="eth0:svc", broadcast="10.0.0.255", noprefixroute=True,
                 scope="link").add_argv() == [
        "addr", "add", "10.0.0.5/24", "dev", "eth0", "scope", "link", "broadcast", "10.0.0.255", "label",
        "eth0:svc", "noprefixroute"]


def test_gratuitous_arp_frames() -> None:
    address = ipaddress.IPv4Address("10.0.0.5")
    request, reply = netaddr.garp_frames(address, MAC)
    for frame, op, tha in ((request, 1, b"\0" * 6), (reply, 2, MAC)):
        assert len(frame) == 42  # 14 bytes of Ethernet header, 28 of ARP
        dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
        assert (dst, src, ethertype) == (b"\xff" * 6, MAC, 0x0806)
        htype, ptype, hlen, plen, got_op = struct.unpack("!HHBBH", frame[14:22])
        assert (htype, ptype, hlen, plen, got_op) == (1, 0x0800, 6, 4, op)
        sha, spa, got_tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
        assert (sha, spa, got_tha, tpa) == (MAC, address.packed, tha, address.packed)


def test_take_with_no_addresses_touches_nothing() -> None:
    with netaddr.take([], "no-such-device"):
        pass
