"""CRI log framing and the pump: bytes in, exact records out, nothing lost."""

from __future__ import annotations

import itertools
import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logs import FdSink, Framer, pump, timestamp

from .cri_log import records, stream_bytes


def frame_all(chunks: list[bytes], max_line: int, stream: str = "stdout") -> bytes:
    framer = Framer(stream, max_line)
    return b"".join(framer.feed(c) for c in chunks) + framer.finish()


def test_timestamp_is_rfc3339_nano_utc() -> None:
    assert timestamp(1_795_431_311_123_456_789) == b"2026-11-23T10:55:11.123456789Z"
    assert timestamp(0) == b"1970-01-01T00:00:00.000000000Z"


def test_full_and_partial_lines() -> None:
    out = frame_all([b"hello\nwor", b"ld\ntail"], max_line=100)
    assert [(r.tag, r.content) for r in records(out)] == [
        ("F", b"hello"),
        ("F", b"world"),
        ("P", b"tail"),
    ]


def test_long_line_split_into_exact_chunks() -> None:
    out = frame_all([b"a" * 10 + b"\n", b"b" * 8 + b"\n"], max_line=4)
    assert [(r.tag, r.content) for r in records(out)] == [
        ("P", b"aaaa"),
        ("P", b"aaaa"),
        ("F", b"aa"),
        ("P", b"bbbb"),
        ("F", b"bbbb"),
    ]


def test_bytes_pass_through_unchanged() -> None:
    data = b"\xff\xfe\x00nul\r\n\tcr\rmid\n"
    out = frame_all([data], max_line=100)
    assert [r.content for r in records(out)] == [b"\xff\xfe\x00nul\r", b"\tcr\rmid"]
    assert stream_bytes(out, "stdout") == data


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=300).map(lambda b: b.replace(b"\x01", b"\n")),
    cuts=st.lists(st.integers(0, 300), max_size=10),
    max_line=st.integers(1, 40),
)
def test_framing_round_trips(data: bytes, cuts: list[int], max_line: int) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    out = frame_all(chunks, max_line)
    assert stream_bytes(out, "stdout") == data
    assert all(len(r.content) <= max_line for r in records(out))


async def test_pump_reads_a_real_pipe_to_eof(tmp_path) -> None:  # type: ignore[no-untyped-def]
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sink = FdSink.open(str(tmp_path / "log"))
    payload = b"".join(b"line %d\n" % i for i in range(20000)) + b"no newline"

    async def writer() -> None:
        await trio.to_thread.run_sync(_write_all, write_fd, payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, read_fd, "stderr", sink)
        nursery.start_soon(writer)
    sink.close()
    data = (tmp_path / "log").read_bytes()
    assert stream_bytes(data, "stderr") == payload
    assert {r.stream for r in records(data)} == {"stderr"}


async def test_pump_cancelled_keeps_buffered_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.write(write_fd, b"first\nsecond")
    sink = FdSink.open(str(tmp_path / "log"))
    with trio.move_on_after(0.2):
        await pump(read_fd, "stdout", sink)
    os.close(write_fd)
    sink.close()
    assert stream_bytes((tmp_path / "log").read_bytes(), "stdout") == b"first\nsecond"


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def test_max_line_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_line"):
        Framer("stdout", 0)
