"""Which resolved addresses the proxy refuses to connect to, whatever the name.

The proxy checks the address it is about to connect to, after resolving the
name itself, so a name that resolves (or re-resolves: DNS rebinding) to an
internal address gets nothing. Refused unless a CIDR rule of the run's
allowlist covers the address explicitly:

- loopback, RFC 1918 and other non-public ranges (CGNAT, benchmarking,
  documentation, reserved, multicast, unspecified);
- link-local, which holds the cloud metadata endpoint 169.254.169.254
  (and fd00:ec2::254, 100.100.100.200 are named as metadata too);
- unique-local IPv6 (fc00::/7);
- this host's own addresses, on every interface of the root namespace;
- IPv4 addresses wrapped in IPv6 (v4-mapped, NAT64, 6to4, Teredo) are judged
  by the IPv4 address inside.
"""

from __future__ import annotations

import ipaddress
import time

from .egress import IPAddress

METADATA: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.IPv6Network("fc00::/7")


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address carried inside an IPv6 one, if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def classify(ip: IPAddress, host_addresses: frozenset[IPAddress] = frozenset()) -> str | None:
    """Why `ip` is not a public destination, or None when it is one."""
    inner = unwrap(ip)
    # The embedded IPv4 address first: it says what the destination really is.
    for a in dict.fromkeys((inner, ip)):
        if a in METADATA:
            return "a cloud metadata address"
        if a in host_addresses:
            return "one of this host's own addresses"
        if a.is_loopback:
            return "a loopback address"
        if a.is_link_local:
            return "a link-local address"
        if isinstance(a, ipaddress.IPv4Address) and any(a in n for n in _RFC1918):
            return "a private (RFC 1918) address"
        if isinstance(a, ipaddress.IPv6Address) and a in _ULA:
            return "a unique-local IPv6 address"
        if a.is_unspecified or a.is_multicast:
            return "not a unicast address"
        if not a.is_global:
            return "a non-public address"
    return None


class HostAddresses:
    """This host's own addresses (root namespace), re-read at most every `ttl` s.

    Read with pyroute2 in the calling thread: call `get()` from a worker
    thread or accept ~1 ms on the event loop once per `ttl`.
    """

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._at = 0.0
        self._value: frozenset[IPAddress] = frozenset()

    def get(self) -> frozenset[IPAddress]:
        now = time.monotonic()
        if now - self._at >= self.ttl:
            self._value = read_host_addresses()
            self._at = now
        return self._value


def read_host_addresses() -> frozenset[IPAddress]:
    from pyroute2 import IPRoute

    out: set[IPAddress] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
            if addr:
                try:
                    out.add(ipaddress.ip_address(addr.split("%", 1)[0]))
                except ValueError:
                    pass
    return frozenset(out)
