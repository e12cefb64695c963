"""The stdio reader (stdio.LineReader) on a real pipe: what reaches the server,
and what the client is answered when a line is refused."""

from __future__ import annotations

import json
import os

import anyio
import mcp_types
import pytest

from gvisor_mcp.stdio import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_PROGRESS_TOKEN,
    PARSE_ERROR,
    LineReader,
    LockedWriter,
    head_id,
)

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'


async def read_all(chunks: list[bytes], max_line: int = 1 << 20) -> tuple[list, list[tuple]]:
    """(messages yielded, refusals answered) for `chunks` written to a pipe, then EOF."""
    r, w = os.pipe()
    refused: list[tuple] = []

    async def reject(request_id, code, message):  # type: ignore[no-untyped-def]
        refused.append((request_id, code, message))

    reader = LineReader(r, reject, max_line=max_line)
    messages = []

    async def write() -> None:
        os.set_blocking(w, False)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(w, view) :]
                except BlockingIOError:
                    await anyio.wait_writable(w)
            await anyio.sleep(0)  # let the reader see each chunk on its own
        os.close(w)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                async for m in reader:
                    messages.append(m)
    finally:
        os.close(r)
    return messages, refused


async def test_lines_split_joined_blank_and_unterminated():
    notify = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    messages, refused = await read_all(
        [
            PING[:10],
            PING[10:] + b"\n\n   \n" + notify,
            b"\n" + PING.replace(b"1", b"2"),  # no final newline
        ]
    )
    assert refused == []
    assert [type(m) for m in messages] == [
        mcp_types.JSONRPCRequest,
        mcp_types.JSONRPCNotification,
        mcp_types.JSONRPCRequest,
    ]
    assert [getattr(m, "id", None) for m in messages] == [1, None, 2]


async def test_bad_json_is_answered_with_its_id_when_one_can_be_read():
    messages, refused = await read_all([b'{"jsonrpc":"2.0","id":7,"method":"ping"\n', b"garbage\n", PING + b"\n"])
    assert [m.id for m in messages] == [1]  # the next good line still gets through
    assert [(i, c) for i, c, _ in refused] == [(7, PARSE_ERROR), (None, PARSE_ERROR)]
    assert all("not a valid JSON-RPC message" in m for _, _, m in refused)


@pytest.mark.parametrize("bad_id", ['{"a":1}', "[1]", "1.5", "null", "true"])
async def test_a_request_id_that_is_not_a_string_or_integer_is_refused(bad_id):
    line = b'{"jsonrpc":"2.0","id":%s,"method":"ping"}\n' % bad_id.encode()
    messages, refused = await read_all([line, PING + b"\n"])
    assert [m.id for m in messages] == [1]
    [(rid, code, message)] = refused
    assert rid is None and code == INVALID_REQUEST
    assert '"id" is' in message and "a string or an integer" in message


async def test_an_oversize_line_is_refused_as_it_arrives_and_the_next_one_read():
    big = b'{"jsonrpc":"2.0","id":"big","method":"tools/call","params":{"x":"' + b"a" * 300_000 + b'"}}\n'
    chunks = [big[i : i + 65536] for i in range(0, len(big), 65536)] + [PING + b"\n"]
    messages, refused = await read_all(chunks, max_line=100_000)
    assert [m.id for m in messages] == [1]
    [(rid, code, message)] = refused
    assert (rid, code) == ("big", INVALID_REQUEST) and "longer than 100000 bytes" in message


async def test_progress_tokens_are_bounded():
    def call(token: object) -> bytes:
        return (
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 3,
                    "method": "tools/call",
                    "params": {"name": "list_active", "arguments": {}, "_meta": {"progressToken": token}},
                }
            ).encode()
            + b"\n"
        )

    ok = "t" * MAX_PROGRESS_TOKEN
    messages, refused = await read_all(
        [call(ok), call("t" * (MAX_PROGRESS_TOKEN + 1)), call(2**60), call({"x": 1}), call(True)]
    )
    assert len(messages) == 1 and messages[0].params["_meta"]["progressToken"] == ok
    assert [(rid, code) for rid, code, _ in refused] == [(3, INVALID_PARAMS)] * 4
    assert f"at most {MAX_PROGRESS_TOKEN}" in refused[0][2] and "2^53" in refused[1][2]
    assert all(ok not in m for _, _, m in refused)  # never echoed


def test_head_id_reads_only_plain_ids_near_the_start():
    assert head_id(b'{"id": 12, ...') == 12
    assert head_id(b'{"id":"abc\\"d"') == 'abc"d'
    assert head_id(b'{"method":"x"}') is None
    assert head_id(b" " * 5000 + b'"id":1') is None  # only the first 4 KiB are looked at


async def test_the_error_answer_is_one_json_rpc_line():
    lines: list[str] = []

    class Out:
        async def write(self, text: str) -> None:
            lines.append(text)

    await LockedWriter(Out()).error(9, INVALID_REQUEST, "why")
    assert [json.loads(x) for x in lines] == [
        {"jsonrpc": "2.0", "id": 9, "error": {"code": INVALID_REQUEST, "message": "why"}}
    ]
    assert lines[0].endswith("\n") and lines[0].count("\n") == 1


async def test_the_writer_survives_a_client_that_closed_its_end():
    """A BrokenPipeError must not escape the writer (it crashed the server in a soak)."""
    r, w = os.pipe()
    os.close(r)
    writer = LockedWriter(anyio.wrap_file(os.fdopen(w, "w", buffering=1)))
    await writer.write(PING.decode() + "\n")
    await writer.flush()
    assert writer.client_gone
    await writer.write("dropped\n")


def _interrupted_writes(write) -> bytes:  # type: ignore[no-untyped-def]
    """What arrives when `write` sends 1 MiB into a pipe whose reader is slow, while the
    writing thread is hit by a signal every 2 ms (mostly while it waits on the full pipe)."""
    import contextlib
    import signal
    import threading
    import time

    r, w = os.pipe()
    os.set_blocking(r, False)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a handler: the signal interrupts write(2)
    try:
        writer = threading.Thread(target=write, args=(w, b"x" * (1 << 20) + b"\n"))
        writer.start()
        got = bytearray()
        while True:
            alive = writer.is_alive()
            if alive and writer.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(writer.ident, signal.SIGUSR1)
            try:
                got += os.read(r, 1 << 14)
            except BlockingIOError:
                if not alive:
                    break
            time.sleep(0.002)
        writer.join()
        return bytes(got)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(r)
        os.close(w)


def test_an_answer_cut_short_by_a_signal_is_written_whole():
    """The soak lost an answer's tail past 64 KiB when its write(2) on the full pipe was cut
    short; write_all writes the rest. (The unbuffered file it replaces loses bytes here.)"""
    from io import TextIOWrapper

    from gvisor_mcp.stdio import write_all

    def old(fd: int, data: bytes) -> None:
        TextIOWrapper(os.fdopen(os.dup(fd), "wb", buffering=0), encoding="utf-8", write_through=True).write(
            data.decode()
        )

    assert _interrupted_writes(write_all) == b"x" * (1 << 20) + b"\n"
    assert len(_interrupted_writes(old)) < (1 << 20) + 1  # the failure this guards against, reproduced
