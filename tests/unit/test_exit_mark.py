"""The warm path's exit mark: found across any chunking, never captured,
and output before it reaches the writers without delay."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gvisor_mcp.sandbox.output import BoundedCapture
from gvisor_mcp.sandbox.output import pump as _pump

MARK = b"@@gvisor-mcp-exit-0123456789abcdef@@"


class Chunks:
    """A byte stream delivering fixed chunks, then EOF (an anyio-like receiver)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None)  # no timing asserts: an example took 260 ms at load 30
@given(
    st.binary(max_size=200),
    st.integers(0, len(MARK) - 1),
    st.binary(max_size=50),
    st.lists(st.integers(0, 400), max_size=8),
    st.booleans(),
)
@pytest.mark.slow
def test_mark_is_found_across_any_chunking_and_never_captured(a, k, b, cuts, with_mark):
    # Output may contain any proper beginning of the mark, even right before it.
    body = a + MARK[:k] + b + MARK[:k]
    assume(MARK not in body)
    data = body + (MARK + b"042" + b"after" if with_mark else b"")
    # Only the stub can write the mark (its nonce is secret to the output):
    # the first mark in the stream is the stub's.
    assume(not with_mark or data.find(MARK) == len(body))
    seen: list[bytes] = []
    cap = BoundedCapture(1 << 20, seen.append)

    async def go():
        return await _pump(Chunks(split(data, cuts)), cap, MARK, 3)

    got = anyio.run(go)
    assert (got == b"042") if with_mark else (got is None)
    assert cap.value() == body and b"".join(seen) == body


async def test_output_is_not_held_back_when_it_cannot_begin_the_mark():
    seen: list[bytes] = []
    cap = BoundedCapture(1 << 20, seen.append)

    class Live:
        def __init__(self) -> None:
            self.sent = False

        async def receive(self, max_bytes: int = 65536) -> bytes:
            if not self.sent:
                self.sent = True
                return b"started\n"
            assert b"".join(seen) == b"started\n"  # delivered before the stream goes on
            raise anyio.EndOfStream

    assert await _pump(Live(), cap, MARK, 3) is None


def test_claim_line_execs_once_when_it_can_and_falls_back_to_env_otherwise():
    from gvisor_mcp.sandbox import ContainerOptions
    from gvisor_mcp.sandbox.stub import claim_line

    o = ContainerOptions(command=["/bin/sh", "-c", "echo $X"], workdir="/tmp")
    line = claim_line(o, {"X": "1", "PATH": "/bin"}, ("PATH", "HOME")).decode()
    assert (
        "/usr/bin/env" not in line
        and "; unset HOME OLDPWD PATH PWD; export PWD=/tmp X=1 PATH=/bin; exec /bin/sh" in line
    )
    assert "(" not in line.split("exec", 1)[0]  # no subshell: the stub forked it at boot
    # A key dash cannot export: the /usr/bin/env -i path, with the same variables.
    line = claim_line(o, {"X-Y": "1"}, ("PATH",)).decode()
    assert "exec /usr/bin/env -i -- PWD=/tmp X-Y=1 /bin/sh" in line
    # Workdir `/`: no PWD, like a cold run (which needs no cd there).
    root = ContainerOptions(command=["env"], workdir="/")
    assert "PWD=" not in claim_line(root, {"X": "1"}, ("PATH",)).decode().split("unset")[1].split(";", 1)[1]


def test_the_stub_protocol_with_a_real_shell(tmp_path):
    """STUB_COMMAND under the host's /bin/sh (dash, as in the sandbox): the
    boot line gives the mark, the claim line runs the command in the
    subshell forked at boot with the rest of stdin, and PID 1 reports the
    status after the command's own output. The mark is in no argv."""
    import subprocess

    from gvisor_mcp.sandbox import ContainerOptions
    from gvisor_mcp.sandbox.stub import STUB_COMMAND, boot_line, claim_line

    mark = "@@gvisor-mcp-exit-00ff@@"
    o = ContainerOptions(
        command=["/bin/sh", "-c", "cat; ps -o args= -p $PPID 2>/dev/null; exit 7"], workdir=str(tmp_path)
    )
    stdin = boot_line(mark) + claim_line(o, {"PATH": "/usr/bin:/bin"}, ("PATH",)) + b"from stdin\n"
    r = subprocess.run(list(STUB_COMMAND), input=stdin, capture_output=True)
    assert r.returncode == 7
    out = r.stdout.decode()
    assert out.startswith("from stdin\n") and out.endswith(mark)
    assert mark not in out[: -len(mark)]  # not in the parent's argv, which `ps` printed
    assert r.stderr.decode() == f"{mark}007"
    # EOF instead of a claim (an idle sandbox being stopped): it ends.
    r = subprocess.run(list(STUB_COMMAND), input=boot_line(mark), capture_output=True, timeout=10)
    assert r.returncode != 0 and r.stdout.decode() == mark


@pytest.mark.slow
def test_the_mark_is_looked_for_only_at_the_end_of_the_stream():
    """The stub writes it last; output after it (a background child) means the
    run ends the slow way, at sandbox exit, with that output kept."""

    async def pump(data: bytes):
        cap = BoundedCapture(1 << 24)
        return await _pump(Chunks([data]), cap, MARK, 3), cap.value()

    big = b"\0" * 5_000_000
    assert anyio.run(pump, big + MARK + b"007") == (b"007", big)
    late = b"x" * 100
    assert anyio.run(pump, big + MARK + b"007" + late) == (None, big + MARK + b"007" + late)
