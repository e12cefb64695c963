"""A test "internet" that the tests build themselves, on this machine only.

A network namespace I (`ip netns add`) joined to the root namespace by one
veth, with a /29 from 198.18.0.0/15 (benchmarking space, never routed
anywhere): root side .1, and in I

- web.test  = .2: HTTP on :80 and HTTPS on :443 (certificate from a CA
  made here), serving /hello and /bytes/N (N bytes, streamed);
- pypi.test = .3: pypiserver on :80 serving one small wheel built here.

Names reach the proxy through the server's static host map (`--egress-host`,
NetworkConfig.hosts), with system DNS off, so no name is ever looked up
outside. Nothing here routes anywhere but between root and I.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from base64 import urlsafe_b64encode
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "internet_server.py"
WHEEL_NAME = "gvmcp_hello"
WHEEL_VERSION = "1.0"
GREETING = "hello from a test wheel"


@dataclass
class Internet:
    netns: str
    root_ifname: str
    subnet: str
    gateway: str
    web: str
    pypi: str
    ca_pem: Path
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def hosts(self) -> dict[str, list[str]]:
        return {"web.test": [self.web], "pypi.test": [self.pypi]}

    @property
    def egress_host_args(self) -> list[str]:
        return [f"--egress-host=web.test={self.web}", f"--egress-host=pypi.test={self.pypi}"]

    def policy_egress(self) -> dict:
        """The egress section that reaches it: names plus their /32s (198.18/15 is
        not public, so the proxy refuses it unless a CIDR says otherwise)."""
        return {
            "allow": [
                "web.test",
                "pypi.test",
                {"cidr": f"{self.web}/32", "ports": [80, 443]},
                {"cidr": f"{self.pypi}/32", "ports": [80]},
            ]
        }

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["ip", "link", "del", self.root_ifname], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        x = random.randint(128, 250)
        if f"198.18.{x}." not in used:
            return x
    raise RuntimeError("no free 198.18.X.0/29 for the test internet")


def build_wheel(directory: Path) -> Path:
    """A pure-Python wheel by hand (zip + dist-info): no build tools needed."""
    dist = f"{WHEEL_NAME}-{WHEEL_VERSION}"
    files = {
        f"{WHEEL_NAME}.py": f'GREETING = "{GREETING}"\n'.encode(),
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {WHEEL_NAME.replace('_', '-')}\nVersion: {WHEEL_VERSION}\n"
            "Summary: a wheel built by the gvisor-mcp tests\n"
        ).encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: gvisor-mcp-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def make_ca(directory: Path, name: str = "web.test", ip: str | None = None) -> tuple[Path, Path, Path]:
    """A CA and a certificate for `name` (and `ip`, if given) signed by it (cryptography)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gvisor-mcp test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name)] + ([x509.IPAddress(ipaddress.ip_address(ip))] if ip else [])
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "web.pem", directory / "web.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem, cert_pem, key_pem


def _wait_port(netns: str, addr: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(({addr!r}, {port}), 1).close()"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"test internet server exited early ({proc.args})")
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"test internet {addr}:{port} did not come up")


def start(workdir: Path) -> Internet:
    workdir.mkdir(parents=True, exist_ok=True)
    x = _free_subnet()
    tag = f"{os.getpid() % 100000}{random.randint(0, 99):02d}"
    netns, root_if = f"gvmcp-ti-{tag}", f"gvti{tag}"[:15]
    net = Internet(
        netns=netns,
        root_ifname=root_if,
        subnet=f"198.18.{x}.0/29",
        gateway=f"198.18.{x}.1",
        web=f"198.18.{x}.2",
        pypi=f"198.18.{x}.3",
        ca_pem=workdir / "ca.pem",
        workdir=workdir,
    )
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", root_if, "type", "veth", "peer", "name", "i0", "netns", netns)
        _run("ip", "addr", "add", f"{net.gateway}/29", "dev", root_if)
        _run("ip", "link", "set", root_if, "up")
        for cmd in (
            f"addr add {net.web}/29 dev i0",
            f"addr add {net.pypi}/29 dev i0",
            "link set i0 up",
            "link set lo up",
        ):
            _run("ip", "-n", netns, *cmd.split())
        ca, cert, key = make_ca(workdir)
        packages = workdir / "packages"
        packages.mkdir(exist_ok=True)
        build_wheel(packages)
        with open(workdir / "web.log", "wb") as web_log:  # the child keeps its own copy of the fd
            web = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, str(SERVER), net.web, str(cert), str(key)],
                stdout=subprocess.DEVNULL,
                stderr=web_log,
            )
        net.procs.append(web)
        pypi_bin = Path(sys.executable).with_name("pypi-server")
        with open(workdir / "pypi.log", "wb") as pypi_log:
            pypi = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    str(pypi_bin),
                    "run",
                    "-i",
                    net.pypi,
                    "-p",
                    "80",
                    "--disable-fallback",
                    "-a",
                    ".",
                    "-P",
                    ".",
                    str(packages),
                ],
                stdout=subprocess.DEVNULL,
                stderr=pypi_log,
            )
        net.procs.append(pypi)
        _wait_port(netns, net.web, 80, web)
        _wait_port(netns, net.web, 443, web)
        _wait_port(netns, net.pypi, 80, pypi)
    except BaseException:
        net.stop()
        raise
    return net
