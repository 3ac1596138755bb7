"""Logs: a child's pipes pumped into CRI-format log records.

Format (DESIGN §6, kubelet's container log format), one record per line::

    2026-11-23T10:55:11.123456789Z stdout F hello

RFC 3339 UTC timestamp with nanoseconds, the stream, ``F`` for a full line or
``P`` for a partial one (a line longer than ``max_line`` is cut into ``P``
chunks of exactly ``max_line`` bytes, its last piece ``F``; an unterminated
tail at end of input is ``P``), then the bytes as written. Bytes are not
decoded: invalid UTF-8, NUL and ``\\r`` pass through (``\\r\\n`` ends a line
whose content keeps its ``\\r``, as kubelet does).

:class:`Framer` is the pure core (bytes in, records out, one timestamp per
chunk); :func:`pump` is the trio loop that reads a pipe and feeds a
:class:`LogSink`. Sinks that write files live in :mod:`supervisor.logfile`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import trio

from .logfile import FdSink, LogEvent, LogFile

__all__ = [
    "DEFAULT_MAX_LINE",
    "FINAL_FLUSH_TIMEOUT",
    "FdSink",
    "Framer",
    "LogEvent",
    "LogFile",
    "LogSink",
    "VectorSink",
    "WaitingSink",
    "pump",
    "timestamp",
]

DEFAULT_MAX_LINE = 16384
#: Bytes read from a pipe at once when it holds that much. Fewer, larger reads
#: and writes cost less CPU per byte (bench/logs.py: 256 KiB took about 30 %
#: less than 64 KiB on 64-byte lines; larger gained nothing more). This only
#: pays because a chunk's records are written with writev straight from the
#: replace result: joining them into one string again (and again for each
#: concatenation) made every chunk above 128 KiB fresh mmap'ed memory with
#: page faults, 3x the CPU.
READ_SIZE = 1 << 18
#: A pump asks for this much first, and for :data:`READ_SIZE` only after a read
#: came back full (the pipe holds more): a read of a few bytes into a
#: 256 KiB buffer costs an mmap and munmap (17 us instead of 1.3 us).
FIRST_READ = 1 << 16
#: A pump busy with a continuous stream lets other tasks run after this many
#: chunks (at most about half a millisecond of work).
CHUNKS_PER_CHECKPOINT = 2
#: The capacity asked for the log pipes (F_SETPIPE_SZ; the kernel caps it at
#: /proc/sys/fs/pipe-max-size): a program can write this much ahead of the pump.
PIPE_SIZE = 1 << 20
#: After the pump was cancelled (drain grace over), how long it may still
#: wait for a full disk to take the last records before giving up on them.
FINAL_FLUSH_TIMEOUT = 5.0


def timestamp(ns: int | None = None) -> bytes:
    """RFC 3339 UTC with nanoseconds: ``2026-11-23T10:55:11.123456789Z``."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    return b"%s.%09dZ" % (_seconds_text(seconds), fraction)


@functools.lru_cache(maxsize=4)
def _seconds_text(seconds: int) -> bytes:
    # Chunks come many per second: format the date and time once per second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()


@dataclass
class Framer:
    """Turns one stream's bytes into CRI records; no I/O.

    Feed chunks in order with :meth:`feed` (or :meth:`frame`, which returns the
    records as buffers to write with one ``writev``); call :meth:`finish` at
    end of input for the unterminated tail. Lines are never merged across
    streams. Cost is one ``bytes.replace`` over each chunk plus a ``find`` per
    ``max_line / 2`` bytes; Python loops run per over-long line and per
    ``max_line``-sized piece of it, never per line or byte.
    """

    stream: str
    max_line: int = DEFAULT_MAX_LINE
    _pending: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.max_line < 1:
            raise ValueError("max_line must be at least 1")
        # A run of more than max_line non-newline bytes covers a whole block of
        # this size in any tiling of the bytes after it starts: one find() per
        # block finds every over-long line.
        self._block = (self.max_line + 1) // 2
        self._stream = self.stream.encode()

    def feed(self, chunk: bytes, ns: int | None = None) -> bytes:
        """Records for every complete line of ``chunk`` (and any over-long prefix)."""
        return b"".join(self.frame(chunk, ns))

    def frame(self, chunk: bytes, ns: int | None = None) -> list[bytes | memoryview]:
        """Like :meth:`feed`, as a list of buffers whose concatenation is the records.

        The buffers are views of one ``bytes.replace`` result and of ``chunk``:
        written with ``os.writev`` they are never copied into one string.
        """
        if not chunk:
            return []
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._pending = data
            return self._cut_long_tail(ns)
        full = self._prefix(b"F", ns)
        sep = b"\n" + full
        long_lines = self._long_lines(data, end)
        if not long_lines:
            # The hot path: a prefix after every newline with one C-level
            # replace (the tail after the last newline included, then cut off
            # by the view: no slice copied before or after the replace).
            framed = data.replace(b"\n", sep)
            drop = len(full) + len(data) - end - 1
            parts: list[bytes | memoryview] = [full, memoryview(framed)[: len(framed) - drop]]
        else:
            parts = []
            start = 0
            for line_start, line_end in long_lines:
                if line_start > start:  # short lines before the long one: one replace
                    parts += (full, data[start : line_start - 1].replace(b"\n", sep), b"\n")
                self._cut_line(memoryview(data), line_start, line_end, full, parts, ns)
                start = line_end + 1
            if start <= end:
                parts += (full, data[start:end].replace(b"\n", sep), b"\n")
        self._pending = data[end + 1 :]
        if len(self._pending) > self.max_line:
            parts += self._cut_long_tail(ns)
        return parts

    def finish(self, ns: int | None = None) -> bytes:
        """The record for an unterminated tail (``P``), if any."""
        tail, self._pending = self._pending, b""
        return self._prefix(b"P", ns) + tail + b"\n" if tail else b""

    def _long_lines(self, data: bytes, end: int) -> list[tuple[int, int]]:
        """(start, newline index) of each line of ``data[:end + 1]`` longer than ``max_line``."""
        if end <= self.max_line:
            return []
        found = []
        block = self._block
        start = 0
        while start < end:
            if data.find(b"\n", start, start + block) >= 0:
                start += block
                continue
            line_start = data.rfind(b"\n", 0, start) + 1
            line_end = data.find(b"\n", start)  # found: data[end] is a newline
            if line_end - line_start > self.max_line:
                found.append((line_start, line_end))
            start = line_end + 1  # the blocks after a newline tile the rest anew
        return found

    def _prefix(self, tag: bytes, ns: int | None) -> bytes:
        return b"%s %s %s " % (timestamp(ns), self._stream, tag)

    def _cut_line(
        self,
        view: memoryview,
        start: int,
        end: int,
        full: bytes,
        parts: list[bytes | memoryview],
        ns: int | None,
    ) -> None:
        """Records of the over-long line ``view[start:end]``: ``P`` pieces, the last ``F``."""
        partial = self._prefix(b"P", ns)
        step = self.max_line
        last = start + (end - start - 1) // step * step
        for i in range(start, last, step):
            parts += (partial, view[i : i + step], b"\n")
        parts += (full, view[last:end], b"\n")

    def _cut_long_tail(self, ns: int | None) -> list[bytes | memoryview]:
        if len(self._pending) <= self.max_line:
            return []
        data = self._pending
        partial = self._prefix(b"P", ns)
        keep = len(data) % self.max_line or self.max_line
        view = memoryview(data)
        parts: list[bytes | memoryview] = []
        for i in range(0, len(data) - keep, self.max_line):
            parts += (partial, view[i : i + self.max_line], b"\n")
        self._pending = data[-keep:]
        return parts


class LogSink(Protocol):
    """Where records go. ``write`` gets whole records and must keep them whole."""

    def write(self, records: bytes) -> None: ...


@runtime_checkable
class VectorSink(Protocol):
    """A sink that also takes records as buffers to concatenate (``writev``).

    The pump prefers ``write_parts`` when a sink has it: the records of a
    chunk then reach the file without being joined into one string first.
    """

    def write(self, records: bytes) -> None: ...

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """``write(b"".join(parts))``."""
        ...


@runtime_checkable
class WaitingSink(Protocol):
    """A sink that may hold records it could not write yet (a full disk).

    ``write`` never blocks: it keeps what it could not write. The pump then
    awaits :meth:`wait_written` before reading the pipe again, so the program
    blocks on its full pipe instead of the supervisor buffering without bound.
    """

    def write(self, records: bytes) -> None: ...

    async def wait_written(self) -> None:
        """Return once every record given to ``write`` is written (or given up)."""
        ...


async def pump(
    read_fd: int, stream: str, sink: LogSink, *, max_line: int = DEFAULT_MAX_LINE
) -> None:
    """Read ``read_fd`` to end of file, writing CRI records to ``sink``.

    Takes ownership of ``read_fd`` and closes it. Returns at EOF (every
    writer, including grandchildren, closed the pipe) or when cancelled;
    either way what is still buffered in the pipe and the unterminated tail
    are written before returning (waiting at most :data:`FINAL_FLUSH_TIMEOUT`
    for a sink that cannot take them). Memory stays bounded: one read of at
    most :data:`READ_SIZE` bytes (and its records) is in flight per pipe;
    while the sink cannot write, the pipe is not read and the writer blocks
    once the pipe (:data:`PIPE_SIZE`) is full. At cancellation the pipe's content (at most
    :data:`PIPE_SIZE`) is read at once.
    """
    framer = Framer(stream, max_line)
    waiting = isinstance(sink, WaitingSink)
    emit = sink.write_parts if isinstance(sink, VectorSink) else _joining(sink)
    with contextlib.suppress(OSError):  # a bigger pipe: the program runs ahead of us
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    os.set_blocking(read_fd, False)
    try:
        chunks = 0
        size = FIRST_READ
        while True:
            # Read while there is data; yield to other tasks every few chunks
            # (trio's FdStream would pass through the scheduler on every read).
            try:
                chunk = os.read(read_fd, size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(read_fd)
                continue
            if not chunk:
                break
            size = READ_SIZE if len(chunk) == size else FIRST_READ
            emit(framer.frame(chunk))
            if waiting:
                await sink.wait_written()  # type: ignore[attr-defined]
            chunks += 1
            if chunks % CHUNKS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
    finally:
        with trio.CancelScope(shield=True):
            # Whatever is still buffered in the pipe was written by the program:
            # keep it even when the pump is being cancelled.
            _drain_nonblocking(read_fd, framer, emit)
            sink.write(framer.finish())
            if waiting:
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                    await sink.wait_written()  # type: ignore[attr-defined]
            trio.lowlevel.notify_closing(read_fd)
            os.close(read_fd)


Emit = Callable[[Sequence[bytes | memoryview]], None]


def _joining(sink: LogSink) -> Emit:
    """``sink.write`` for sinks without ``write_parts``: the buffers joined."""
    return lambda parts: sink.write(b"".join(parts))


def _drain_nonblocking(fd: int, framer: Framer, emit: Emit) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError:  # BlockingIOError included: the pipe is empty
            return
        if not chunk:
            return
        emit(framer.frame(chunk))
