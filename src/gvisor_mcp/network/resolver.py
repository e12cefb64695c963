"""Name resolution done by the proxy, never by the sandbox.

Order: the run's own `hosts` (policy `network.egress.hosts`, for internal
mirrors), then the server's static `hosts` (a server setting; the tests map
their `.test` names this way), then the system resolver when the server
allows it. A server started with `system_dns=False` never sends a DNS query
for a sandbox, whatever the policy says.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

import anyio

from .egress import IPAddress

DNS_TIMEOUT = 5.0


class ResolveError(Exception):
    """The name has no usable address; the text is the reason shown to the agent."""


class Resolver:
    def __init__(self, hosts: Mapping[str, tuple[IPAddress, ...]] | None = None, *, system_dns: bool = True) -> None:
        self.hosts = dict(hosts or {})
        self.system_dns = system_dns

    async def resolve(
        self, name: str, port: int, extra: Mapping[str, tuple[IPAddress, ...]] | None = None
    ) -> list[IPAddress]:
        for table in (extra or {}, self.hosts):
            if name in table:
                return list(table[name])
        if not self.system_dns:
            raise ResolveError("could not be resolved (no static address, and this server does not use DNS)")
        try:
            with anyio.fail_after(DNS_TIMEOUT):
                infos = await anyio.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise ResolveError(f"could not be resolved (DNS did not answer in {DNS_TIMEOUT:g} s)") from None
        except OSError as e:
            raise ResolveError(f"could not be resolved ({e.strerror or e})") from None
        out: list[IPAddress] = []
        for *_, addr in infos:
            ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
            if ip not in out:
                out.append(ip)
        if not out:
            raise ResolveError("could not be resolved (no address)")
        return out
