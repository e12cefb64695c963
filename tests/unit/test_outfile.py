"""OutputFile (a cold run's stdout/stderr as a file, sandbox/outfile.py):
the capture from a file is the capture of the stream (head + tail exactly,
every byte counted), writers get every byte up to the cap and a count after
it, and the file does not keep what can no longer be part of the result.

The writes here come from this process through the file's O_APPEND end,
as the sentry's do; tests/integration/test_output_files.py runs real runsc.
"""

from __future__ import annotations

import fcntl
import os

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvisor_mcp.sandbox import outfile
from gvisor_mcp.sandbox.outfile import OutputFile, can_punch
from gvisor_mcp.sandbox.output import BoundedCapture, accepts_skips


def expected(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    head, tail = limit // 2, limit - limit // 2
    return data[:head] + (data[-tail:] if tail else b"")


class Writer:
    """A writer that takes skips, as the server's (jobs.py) does."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.skips: list[int] = []

    def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def skipped(self, n: int) -> None:
        self.skips.append(n)


def follow(path, batches: list[bytes], limit: int, writer=None) -> tuple[BoundedCapture, OutputFile]:
    """Write each batch, then let the pump take one look; end after the last."""
    f = OutputFile(path)
    cap = BoundedCapture(limit, writer)

    async def go() -> None:
        for b in batches:
            os.write(f.writer_fd, b)
            await f._look(cap)  # deterministic: one look per batch
        ended = anyio.Event()
        ended.set()  # the client has exited: pump takes its last look and the tail
        await f.pump(cap, ended)
        await f.aclose()

    anyio.run(go)
    return cap, f


@pytest.fixture
def small(monkeypatch):
    """Thresholds scaled down so that examples of a few KB exercise skips and punches."""
    monkeypatch.setattr(outfile, "READ_ALL", 64)
    monkeypatch.setattr(outfile, "TAIL_READ", 16)
    monkeypatch.setattr(outfile, "PUNCH_MIN", 4096)
    monkeypatch.setattr(outfile, "CHUNK", 50)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=700), max_size=12),
    limit=st.integers(min_value=0, max_value=600),
    with_writer=st.booleans(),
)
def test_capture_from_a_file_is_the_capture_of_the_stream(tmp_path_factory, sizes, limit, with_writer):
    # Every byte tells its position (mod 251), so a misplaced piece shows.
    stream = bytes(i % 251 for i in range(sum(sizes)))
    at = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    batches = [stream[a:b] for a, b in zip(at, at[1:], strict=False)]
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(outfile, "READ_ALL", 64)
        mp.setattr(outfile, "TAIL_READ", 16)
        mp.setattr(outfile, "CHUNK", 50)
        path = tmp_path_factory.mktemp("of") / "stdout"
        w = Writer() if with_writer else None
        cap, _ = follow(path, batches, limit, w)
    finally:
        mp.undo()
    data = b"".join(batches)
    assert cap.total == len(data)
    assert cap.truncated == (len(data) > limit)
    assert cap.value() == expected(data, limit)
    if w is not None:
        got = b"".join(w.chunks)
        # Every byte up to the cap, in order; after it, pieces and counts
        # that add up to the whole stream.
        assert got[:limit] == data[:limit]
        assert len(got) + sum(w.skips) == len(data)


def test_a_flood_is_skipped_counted_and_punched(tmp_path, small):
    path = tmp_path / "stdout"
    data = bytes(range(256)) * 400  # 102,400 bytes, not all alike
    batches = [data[i : i + 8192] for i in range(0, len(data), 8192)]
    w = Writer()
    limit = 1000
    f = OutputFile(path)
    cap = BoundedCapture(limit, w)

    async def go() -> None:
        for b in batches:
            os.write(f.writer_fd, b)
            await f._look(cap)
        # Before the end: the file keeps only what can still be in the tail.
        kept = os.stat(path).st_blocks * 512
        assert kept <= 4096 + 4096 + cap.tail_cap, kept
        ended = anyio.Event()
        ended.set()
        await f.pump(cap, ended)
        await f.aclose()

    anyio.run(go)
    assert os.stat(path).st_size == len(data)  # the size stays: appends go on at the end
    assert cap.total == len(data) and cap.skipped > 0
    assert cap.value() == expected(data, limit)
    assert b"".join(w.chunks)[:limit] == data[:limit]
    assert len(b"".join(w.chunks)) + sum(w.skips) == len(data)
    # The last line is among what the writer saw (progress shows it).
    assert w.chunks[-1] == data[-len(w.chunks[-1]) :]


def test_without_a_writer_only_the_head_is_read_before_skipping(tmp_path, small):
    path = tmp_path / "stdout"
    data = os.urandom(5000)
    cap, f = follow(path, [data], 1000)
    assert cap.value() == data[:500] + data[-500:]
    assert cap.skipped == 5000 - 500 - 16


def test_output_stays_exact_below_the_cap_after_a_skip(tmp_path, small):
    # A skip can come before the limit (no writer: only the head is read
    # first); the tail is then everything after the head, read back.
    path = tmp_path / "stdout"
    data = os.urandom(800)
    cap, _ = follow(path, [data[:100], data[100:]], 1000)
    assert cap.skipped > 0 and not cap.truncated
    assert cap.value() == data


def test_skipping_before_the_head_is_full_is_refused():
    cap = BoundedCapture(100)
    with pytest.raises(ValueError, match="head"):
        cap.skip(10)


def test_only_writers_that_take_skips_get_a_file():
    assert accepts_skips(None)
    assert accepts_skips(Writer())
    assert not accepts_skips(lambda chunk: None)  # e.g. the CLI streaming to a terminal


def test_the_sandbox_end_appends(tmp_path):
    # What keeps `echo x > /dev/stdout` and `tee /dev/stdout` as with a pipe:
    # the description is O_APPEND, so a write at any offset lands at the end.
    f = OutputFile(tmp_path / "stdout")
    os.write(f.writer_fd, b"one\n")
    os.pwrite(f.writer_fd, b"two\n", 0)
    assert (tmp_path / "stdout").read_bytes() == b"one\ntwo\n"
    anyio.run(f.aclose)
    with pytest.raises(FileExistsError):  # never an existing file
        OutputFile(tmp_path / "stdout")


def test_a_pooled_end_turns_append_once_booted(tmp_path):
    # A pooled stub's stdout: not O_APPEND while the sandbox imports it (the
    # sentry then skips its fstat per write), O_APPEND from set_append on,
    # on the description the sandbox shares (here: a dup, as runsc's copy).
    f = OutputFile(tmp_path / "stdout", append_after_boot=True)
    sandbox = os.dup(f.writer_fd)
    try:
        f.handed_over()  # the client has its copy; ours stays for set_append
        assert f.writer_fd >= 0
        assert not fcntl.fcntl(sandbox, fcntl.F_GETFL) & os.O_APPEND
        f.set_append()
        assert f.writer_fd == -1
        assert fcntl.fcntl(sandbox, fcntl.F_GETFL) & os.O_APPEND
        os.write(sandbox, b"one\n")
        os.pwrite(sandbox, b"two\n", 0)  # `tee /dev/stdout`: the sentry's own offset 0
        assert (tmp_path / "stdout").read_bytes() == b"one\ntwo\n"
    finally:
        os.close(sandbox)
        anyio.run(f.aclose)
    cold = OutputFile(tmp_path / "cold")
    cold.handed_over()  # a cold run's: O_APPEND from the start, ours closed at once
    assert cold.writer_fd == -1
    anyio.run(cold.aclose)


def test_punching_works_where_bundles_live(tmp_path):
    assert can_punch(tmp_path)
    assert not list(tmp_path.iterdir())  # the probe leaves nothing
    assert not can_punch(tmp_path / "missing")


MARK = b"@@gvisor-mcp-exit-0123456789abcdef@@"


def follow_marked(path, batches: list[bytes], limit: int, writer=None) -> tuple[BoundedCapture, bool]:
    """A pooled stub's stdout: each batch written then one look (holding
    back what could begin the mark), then the mark, then the stub's report
    on stderr (`ended`), as the stub writes them."""
    f = OutputFile(path)
    cap = BoundedCapture(limit, writer)

    async def go() -> bool:
        for b in batches:
            os.write(f.writer_fd, b)
            await f._look(cap, f._held_back(MARK))
        os.write(f.writer_fd, MARK)
        ended = anyio.Event()
        ended.set()
        found = await f.pump(cap, ended, MARK, anyio.Event())
        await f.aclose()
        return found

    return cap, anyio.run(go)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    limit=st.integers(min_value=0, max_value=600),
    # Not the last 2: the mark ends as it begins ("@@"), so an output ending
    # in all of the mark but them holds the whole nonce, and reads as the
    # mark (output.pump reads a pipe the same way).
    prefix=st.integers(min_value=0, max_value=len(MARK) - 3),
)
def test_a_pooled_stdout_file_never_captures_its_exit_mark(tmp_path_factory, sizes, limit, prefix):
    # The output may end in any beginning of the mark: held back while the
    # command runs, captured once the real mark follows it.
    stream = bytes(i % 251 for i in range(sum(sizes))) + MARK[:prefix]
    at = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    at[-1] = len(stream)
    batches = [stream[a:b] for a, b in zip(at, at[1:], strict=False)] or [stream]
    w = Writer()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(outfile, "READ_ALL", 64)
        mp.setattr(outfile, "TAIL_READ", 16)
        mp.setattr(outfile, "CHUNK", 50)
        cap, found = follow_marked(tmp_path_factory.mktemp("of") / "stdout", batches, limit, w)
    finally:
        mp.undo()
    assert found
    assert cap.total == len(stream)
    assert cap.value() == expected(stream, limit)
    seen = b"".join(w.chunks)
    assert MARK not in seen
    assert seen[:limit] == stream[:limit]
    assert len(seen) + sum(w.skips) == len(stream)


def test_a_mark_followed_by_more_output_is_followed_to_the_end(tmp_path):
    # A background child wrote after the stub's mark: as with a pipe, the
    # mark is missed and the file is followed until the client exits.
    f = OutputFile(tmp_path / "stdout")
    cap = BoundedCapture(10_000)
    late = b"x" * 100

    async def go() -> bool:
        os.write(f.writer_fd, b"out\n" + MARK + late)
        ended, exited = anyio.Event(), anyio.Event()
        ended.set()
        async with anyio.create_task_group() as tg:

            async def more() -> None:
                await anyio.sleep(0.2)
                os.write(f.writer_fd, b"end\n")
                exited.set()

            tg.start_soon(more)
            found = await f.pump(cap, ended, MARK, exited)
        await f.aclose()
        return found

    assert not anyio.run(go)
    assert cap.value() == b"out\n" + MARK + late + b"end\n"


def test_a_writer_that_wants_every_byte_is_never_skipped(tmp_path, small):
    # The CLI's writer has no `skipped`: past the cap it still gets every byte.
    got: list[bytes] = []
    data = os.urandom(20_000)
    cap, _ = follow(tmp_path / "stdout", [data[:9000], data[9000:]], 1000, got.append)
    assert cap.skipped == 0 and cap.total == len(data)
    assert b"".join(got) == data
    assert cap.value() == expected(data, 1000)
