"""Per-run network namespaces held only by file descriptors.

One run gets two fresh namespaces: S, where runsc's netstack runs (its spec
points at `/proc/<our pid>/fd/<S fd>`), and E, the edge, holding nothing but
the run's proxy listener. A veth pair joins them; nothing joins E to the
root namespace, so from S the proxy is the only reachable address.

Why fds and not `ip netns add`: nothing is mounted or named, so a crashed
server leaves nothing for anyone to sweep (the kernel frees a namespace with
its last reference), and closing is instant (measured in
../shared/notes/network-recipe.md: 0.0 ms against 2-5 ms for `ip netns del`).

Namespace membership is per thread. Everything that must happen *inside*
a namespace (unshare, sysctls, opening netlink and listening sockets) runs on
a throwaway thread that is never reused, so no other thread — the event loop
least of all — ever sees the switch. Sockets keep the namespace they were
created in after the thread leaves it.

Netlink goes through pyroute2's `IPRoute()` opened on that thread; measured
faster than `ip` subprocesses (and than pyroute2's own netns helpers, which
fork a child per call).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import InfrastructureError

CLONE_NEWNET = 0x40000000
SO_BINDTODEVICE = 25
S_IFNAME = "eth0"
"""The sandbox's interface name (runsc copies names from S into the sandbox)."""
E_IFNAME = "edge"
PROXY_PORT = 3128
LO_INDEX = 1
VETH_INDEX = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
T = TypeVar("T")


class NetnsError(InfrastructureError, RuntimeError):
    """A namespace, interface or listener could not be made."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"{what}: {os.strerror(err)} (errno {err})")


def on_fresh_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a new thread that dies afterwards, and return its result.

    Used for anything that switches namespaces: if switching back ever
    failed, that thread would be poisoned, so it is never handed back to a
    pool; it simply ends.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name="gvisor-mcp-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _harden_current() -> None:
    """The calling thread's (new) namespace: no IPv6 at all, no forwarding.

    IPv6 must be off before the veth exists: each end would otherwise get an
    fe80:: address, and E's kernel answers on it (measured: RST from E).
    `default` is what the veth created next inherits; `all` covers lo.
    """
    _write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
    _write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
    _write("/proc/sys/net/ipv4/ip_forward", "0")


@dataclass(frozen=True)
class Slot:
    """One run's /30: E's address (the proxy) and S's (the sandbox)."""

    index: int
    edge: str
    sandbox: str
    prefix: int = 30


@dataclass
class Namespaces:
    """What the server holds for one run: two netns fds and the listener.

    Closing it closes the listener first (an open socket keeps E alive, and
    E's veth end with it), then both namespace fds; the kernel frees the
    rest asynchronously (measured 10-90 ms) without our waiting.
    """

    slot: Slot
    s_fd: int
    e_fd: int
    listener: socket.socket | None
    s_inode: int = 0
    e_inode: int = 0
    closed: bool = field(default=False)

    @property
    def netns_path(self) -> str:
        """What runsc's spec gets: our own fd, seen through /proc."""
        return f"/proc/{os.getpid()}/fd/{self.s_fd}"

    def take_listener(self) -> socket.socket:
        if self.listener is None:
            raise NetnsError("the proxy listener was already taken")
        sock, self.listener = self.listener, None
        return sock

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for fd in (self.s_fd, self.e_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _new_netns() -> tuple[int, int]:
    """unshare a new netns for the calling thread; its fd (O_CLOEXEC) and inode."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd, os.fstat(fd).st_ino


def _listen(slot: Slot, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Only E's veth end: nothing else exists in E today, but a listener
        # must never answer on an interface added later by mistake.
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, E_IFNAME.encode())
        sock.bind((slot.edge, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def create(slot: Slot, port: int = PROXY_PORT) -> Namespaces:
    """Make S and E for `slot`, the veth between them and the proxy listener in E.

    S: `eth0` with the sandbox address, `lo` up, NO default route (a blocked
    connect then fails at once with "No route to host" instead of hanging),
    IPv6 off. E: `edge` with the proxy address, IPv6 off, forwarding off, no
    route anywhere else. Blocking (netlink): call it from a worker thread.
    """
    from pyroute2 import IPRoute  # imported lazily: only sandbox-mode servers need it

    def inside() -> Namespaces:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        s_fd = e_fd = -1
        ipr_s = ipr_e = None
        listener = None
        try:
            s_fd, s_ino = _new_netns()
            _harden_current()
            ipr_s = IPRoute()
            e_fd, e_ino = _new_netns()
            _harden_current()
            ipr_e = IPRoute()
            # Both ends are born in their namespaces: no name ever exists in
            # the root namespace, even for an instant. In a fresh namespace
            # lo is ifindex 1 and the first device made there is 2, on both
            # sides: no lookups (a netlink dump costs 1.5-3 ms each here).
            ipr_s.link(
                "add",
                index=VETH_INDEX,
                ifname=S_IFNAME,
                kind="veth",
                peer={"ifname": E_IFNAME, "net_ns_fd": e_fd},
            )
            ipr_e.addr("add", index=VETH_INDEX, address=slot.edge, prefixlen=slot.prefix)
            ipr_e.link("set", index=VETH_INDEX, state="up")
            ipr_s.addr("add", index=VETH_INDEX, address=slot.sandbox, prefixlen=slot.prefix)
            ipr_s.link("set", index=VETH_INDEX, state="up")
            # Without lo up in S the sandbox has no loopback at all (runsc
            # copies S's interfaces): 127.0.0.1 and DNS then hang or fail slowly.
            ipr_s.link("set", index=LO_INDEX, state="up")
            listener = _listen(slot, port)  # this thread is in E now
            return Namespaces(slot, s_fd, e_fd, listener, s_ino, e_ino)
        except BaseException as e:
            if listener is not None:
                listener.close()
            for fd in (s_fd, e_fd):
                if fd >= 0:
                    os.close(fd)
            if isinstance(e, NetnsError):
                raise
            raise NetnsError(f"could not prepare the run's network namespace: {e}") from e
        finally:
            for ipr in (ipr_s, ipr_e):
                if ipr is not None:
                    ipr.close()  # a netlink socket pins its namespace
            try:
                _check(_libc.setns(own, CLONE_NEWNET), "setns back to the server's namespace")
            finally:
                os.close(own)

    return on_fresh_thread(inside)


class SlotAllocator:
    """Hands out /30s of `network` round-robin, never one still in use.

    Each run has its own S and E, so addresses could even repeat; distinct
    ones make logs and accounting unambiguous, and make another run's proxy
    address a real "elsewhere" (no route) rather than an alias of one's own.
    """

    def __init__(self, network: str = "198.19.0.0/16") -> None:
        self.network = ipaddress.IPv4Network(network)
        self.size = self.network.num_addresses // 4
        self._next = 0
        self._used: set[int] = set()

    def take(self) -> Slot:
        for _ in range(self.size):
            i = self._next
            self._next = (self._next + 1) % self.size
            if i not in self._used:
                self._used.add(i)
                base = self.network.network_address + 4 * i
                return Slot(i, str(base + 1), str(base + 2))
        raise NetnsError(f"all {self.size} network slots of {self.network} are in use")

    def give_back(self, slot: Slot) -> None:
        self._used.discard(slot.index)

    def in_use(self) -> int:
        return len(self._used)


def netns_fds(pid: int | str) -> set[int]:
    """Inodes of the network namespaces process `pid` holds open as fds."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("net:["):
            out.add(int(target[5:-1]))
    return out


def referenced_netns(exclude: Collection[int] = ()) -> set[int]:
    """Inodes of every network namespace some process on this host (but the
    pids in `exclude`) holds (as its own, or through an fd). Tests use it to
    prove a run's S and E are gone; a bind-mounted namespace is not looked
    for (we make none). The kernel reuses a freed namespace's inode number,
    so a process started later may hold the same number for a new one:
    `exclude` leaves such a process out."""
    seen: set[int] = set()
    skip = {str(p) for p in exclude}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in skip:
            continue
        try:
            seen.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
        except OSError:
            pass
        seen |= netns_fds(pid)
    return seen
