"""CRI log framing and the pump: bytes in, exact records out, nothing lost."""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logfile import IOV_MAX, LogEvent
from supervisor.logs import FdSink, Framer, pump, timestamp

from .cri_log import records, stream_bytes


def frame_all(chunks: list[bytes], max_line: int, stream: str = "stdout") -> bytes:
    framer = Framer(stream, max_line)
    return b"".join(framer.feed(c) for c in chunks) + framer.finish()


def reference(data: bytes, max_line: int) -> list[tuple[str, bytes]]:
    """(tag, content) of each record, framed line by line the obvious way."""
    *lines, tail = data.split(b"\n")
    out = []
    for line, last_tag in [*((line, "F") for line in lines), (tail, "P")]:
        pieces = [line[i : i + max_line] for i in range(0, len(line), max_line)] or [b""]
        if line or last_tag == "F":
            out += [("P", p) for p in pieces[:-1]] + [(last_tag, pieces[-1])]
    return out


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


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.integers(0, 120), max_size=40),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
    max_line=st.integers(1, 40),
)
def test_framing_matches_a_line_by_line_reference(
    lines: list[int], cuts: list[int], max_line: int
) -> None:
    """Exact records, timestamp included, for short and over-long lines in any chunking."""
    data = b"".join(bytes([65 + i % 26]) * n + b"\n" for i, n in enumerate(lines)) + b"tail"
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    framer = Framer("stderr", max_line)
    ns = 1_795_431_311_000_000_007
    out = b"".join(framer.feed(data[a:b], ns) for a, b in itertools.pairwise(bounds))
    out += framer.finish(ns)
    expected = reference(data, max_line)
    assert out == b"".join(
        b"2026-11-23T10:55:11.000000007Z stderr %s %s\n" % (tag.encode(), content)
        for tag, content in expected
    )


def test_write_parts_more_buffers_than_writev_takes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    events: list[LogEvent] = []
    sink = FdSink.open(str(tmp_path / "log"), on_event=events.append)
    framer = Framer("stdout", max_line=3)
    data = b"".join(b"%d\n" % i for i in range(2000)) + b"x" * 5000 + b"\n"
    parts = framer.frame(data)
    assert len(parts) > IOV_MAX
    sink.write_parts(parts)
    sink.close()
    assert events == []
    assert stream_bytes((tmp_path / "log").read_bytes(), "stdout") == data


def test_write_parts_short_write_keeps_the_rest() -> None:
    """A pipe that takes only part of one writev: the rest follows, whole and in order."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # 64 KiB: a short writev
    sink = FdSink(write_fd)
    sink.write_parts(Framer("stdout").frame(b"y" * 100_000 + b"\n"))
    assert 0 < sink.pending < 100_000
    sink.write_parts(Framer("stderr").frame(b"after\n"))
    got = bytearray()

    async def drain() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.wait_written)
            while sink.pending or not got:
                with contextlib.suppress(BlockingIOError):
                    got.extend(os.read(read_fd, 1 << 20))
                await trio.sleep(0.001)
        with contextlib.suppress(BlockingIOError):
            got.extend(os.read(read_fd, 1 << 20))

    trio.run(drain)
    sink.close()
    os.close(read_fd)
    assert stream_bytes(bytes(got), "stdout") == b"y" * 100_000 + b"\n"
    assert [(r.stream, len(r.content)) for r in records(bytes(got))][-2:] == [
        ("stdout", 100_000 - 6 * 16384),
        ("stderr", 5),
    ]


async def test_pump_large_reads_keep_exact_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Megabytes at once (reads up to READ_SIZE): long lines across reads, exact records."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sink = FdSink.open(str(tmp_path / "log"))
    short = b"".join(b"line %d\n" % i for i in range(100_000))
    payload = short + b"L" * 300_000 + b"\n" + short + b"z" * 40_000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, read_fd, "stdout", sink)
        nursery.start_soon(trio.to_thread.run_sync, _write_all, write_fd, payload)
    sink.close()
    got = records((tmp_path / "log").read_bytes())
    assert [(r.tag, r.content) for r in got] == reference(payload, 16384)


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
