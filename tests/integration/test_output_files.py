"""Runs write stdout/stderr to files in their bundle (sandbox/outfile.py),
with real runsc: what commands see is as with a pipe, floods are capped with
the exact head and tail, every byte is counted, writers that take skips get
the first cap bytes and a count for the rest, and a writer that wants every
byte gets them all (a cold run then uses pipes). Warm runs too: the pooled
stub's stdout is a file, its stderr a pipe that carries the exit status."""

from __future__ import annotations

import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Manager, ResourceSpec

from ..conftest import leftovers
from .conftest import WarmManager, make_config

pytestmark = pytest.mark.runsc


def sh(script: str, **kw) -> ContainerOptions:
    return ContainerOptions(command=["/bin/sh", "-c", script], **kw)


class Writer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.skips: list[int] = []

    def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def skipped(self, n: int) -> None:
        self.skips.append(n)


@pytest.mark.parametrize(
    ("output_files", "warm"), [(True, False), (False, False), (True, True)], ids=["file", "pipe", "warm-file"]
)
async def test_what_commands_see_is_as_with_a_pipe(sandbox_base, output_files, warm):
    # `> /dev/stdout` neither truncates nor `tee /dev/stdout` writes over
    # what came before: the file is O_APPEND (a pooled stub's from the end
    # of its boot on: outfile.OutputFile.set_append).
    script = (
        "echo one; echo two > /dev/stdout; echo x | tee /dev/stdout; echo three; echo err >&2; "
        "if test -f /dev/stdout; then echo file >&2; else echo pipe >&2; fi; exit 7"
    )
    async with Manager(make_config(sandbox_base, output_files=output_files)) as manager:
        m = WarmManager(manager) if warm else manager
        r = await m.run(sh(script))
        if warm:
            assert r.warm, r.summary()
    assert r.exit_code == 7, r.summary()
    assert r.stdout == b"one\ntwo\nx\nx\nthree\n"
    assert r.stderr == b"err\n" + (b"file\n" if output_files else b"pipe\n")
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_flood_keeps_the_exact_head_and_tail_and_counts_every_byte(sandbox_base, warm):
    # Warm: the pooled stub's stdout is a file too, its stderr a pipe that
    # carries the exit status; the exit mark never reaches the output.
    cap = 1 << 20
    n = 3_000_000  # `seq` writes 20.9 MB, every line different
    expected = b"".join(b"%d\n" % i for i in range(1, n + 1))
    w = Writer()
    async with Manager(make_config(sandbox_base)) as manager:
        m = WarmManager(manager) if warm else manager
        r = await m.run(
            sh(f"seq 1 {n}; echo done >&2", resources=ResourceSpec(max_output_bytes=cap, timeout=120), stdout_writer=w)
        )
    assert r.exit_code == 0, r.summary()
    assert r.stdout_bytes == len(expected) and r.stdout_truncated
    assert r.stdout == expected[: cap // 2] + expected[-(cap - cap // 2) :]
    assert r.stderr == b"done\n"
    seen = b"".join(w.chunks)
    assert seen[:cap] == expected[:cap]  # the live part file's bytes, in order
    assert len(seen) + sum(w.skips) == len(expected)
    assert w.chunks[-1] == expected[-len(w.chunks[-1]) :]  # progress's last line is the real one
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_writer_that_wants_every_byte_gets_them_all(sandbox_base, warm):
    got: list[int] = []
    async with Manager(make_config(sandbox_base)) as manager:
        m = WarmManager(manager) if warm else manager
        r = await m.run(
            sh(
                "head -c 30000000 /dev/zero",
                resources=ResourceSpec(max_output_bytes=4096),
                stdout_writer=lambda c: got.append(len(c)),
            )
        )
    assert r.stdout_bytes == 30_000_000 and len(r.stdout) == 4096
    assert sum(got) == 30_000_000


async def test_a_flood_that_times_out_is_capped_and_leaves_nothing(sandbox_base):
    async with Manager(make_config(sandbox_base)) as m:
        r = await m.run(sh("echo first; yes", resources=ResourceSpec(max_output_bytes=1000, timeout=2)))
    assert r.status == ContainerStatus.TIMED_OUT, r.summary()
    assert r.stdout_truncated and r.stdout_bytes > 1000
    assert r.stdout.startswith(b"first\ny\ny\n") and len(r.stdout) == 1000
    assert set(r.stdout[500:]) <= set(b"y\n")
    assert leftovers(sandbox_base) == {}
