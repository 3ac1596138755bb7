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
import os
import time
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
    "WaitingSink",
    "pump",
    "timestamp",
]

DEFAULT_MAX_LINE = 16384
#: Bytes read from a pipe at once. 64 KiB keeps a chunk and its records (about
#: 1.6x for 64-byte lines) under glibc's 128 KiB mmap threshold and in the CPU
#: cache; with 128 KiB and larger reads every chunk became an mmap/munmap with
#: fresh page faults, 2-3x the CPU per byte (bench/logs.py).
READ_SIZE = 1 << 16
#: A pump busy with a continuous stream lets other tasks run after this many
#: chunks (at most about half a millisecond of work).
CHUNKS_PER_CHECKPOINT = 4
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
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % fraction


@dataclass
class Framer:
    """Turns one stream's bytes into CRI records; no I/O.

    Feed chunks in order with :meth:`feed`; call :meth:`finish` at end of
    input for the unterminated tail. Lines are never merged across streams.
    Cost is a few C-level passes over each chunk (find, replace); the only
    Python loops run per ``max_line``-sized piece, never per line or byte.
    """

    stream: str
    max_line: int = DEFAULT_MAX_LINE
    _pending: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.max_line < 1:
            raise ValueError("max_line must be at least 1")
        # A run of more than max_line non-newline bytes covers a whole block of
        # this size that starts at a multiple of it: checking one find() per
        # block finds every over-long line.
        self._block = (self.max_line + 1) // 2
        self._stream = self.stream.encode()

    def feed(self, chunk: bytes, ns: int | None = None) -> bytes:
        """Records for every complete line of ``chunk`` (and any over-long prefix)."""
        if not chunk:
            return b""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._pending = data
            return self._cut_long_tail(ns)
        self._pending = data[end + 1 :]
        full = self._prefix(b"F", ns)
        if not self._has_long_line(data, end):
            # The hot path: one prefix per line with C-level replace, no Python loop.
            out = full + data[:end].replace(b"\n", b"\n" + full) + b"\n"
        else:
            out = b"".join(self._long_line(line, full, ns) for line in data[:end].split(b"\n"))
        if len(self._pending) > self.max_line:
            out += self._cut_long_tail(ns)
        return out

    def finish(self, ns: int | None = None) -> bytes:
        """The record for an unterminated tail (``P``), if any."""
        tail, self._pending = self._pending, b""
        return self._prefix(b"P", ns) + tail + b"\n" if tail else b""

    def _has_long_line(self, data: bytes, end: int) -> bool:
        """Whether some line of ``data[:end]`` is longer than ``max_line``."""
        if end <= self.max_line:
            return False
        block = self._block
        for start in range(0, end, block):
            if data.find(b"\n", start, min(start + block, end)) < 0:
                line_start = data.rfind(b"\n", 0, start) + 1
                line_end = data.find(b"\n", start, end + 1)
                if line_end - line_start > self.max_line:
                    return True
        return False

    def _prefix(self, tag: bytes, ns: int | None) -> bytes:
        return timestamp(ns) + b" " + self._stream + b" " + tag + b" "

    def _long_line(self, line: bytes, full: bytes, ns: int | None) -> bytes:
        if len(line) <= self.max_line:
            return full + line + b"\n"
        partial = self._prefix(b"P", ns)
        pieces = [line[i : i + self.max_line] for i in range(0, len(line), self.max_line)]
        last = pieces.pop()
        return b"".join(partial + p + b"\n" for p in pieces) + full + last + b"\n"

    def _cut_long_tail(self, ns: int | None) -> bytes:
        if len(self._pending) <= self.max_line:
            return b""
        partial = self._prefix(b"P", ns)
        keep = len(self._pending) % self.max_line or self.max_line
        head, self._pending = self._pending[:-keep], self._pending[-keep:]
        return b"".join(
            partial + head[i : i + self.max_line] + b"\n"
            for i in range(0, len(head), self.max_line)
        )


class LogSink(Protocol):
    """Where records go. ``write`` gets whole records and must keep them whole."""

    def write(self, records: bytes) -> None: ...


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
    most :data:`READ_SIZE` bytes is in flight per pipe; while the sink cannot
    write, the pipe is not read and the writer blocks once the pipe
    (:data:`PIPE_SIZE`) is full. At cancellation the pipe's content (at most
    :data:`PIPE_SIZE`) is read at once.
    """
    framer = Framer(stream, max_line)
    waiting = isinstance(sink, WaitingSink)
    with contextlib.suppress(OSError):  # a bigger pipe: the program runs ahead of us
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    os.set_blocking(read_fd, False)
    try:
        chunks = 0
        while True:
            # Read while there is data; yield to other tasks every few chunks
            # (trio's FdStream would pass through the scheduler on every read).
            try:
                chunk = os.read(read_fd, READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(read_fd)
                continue
            if not chunk:
                break
            sink.write(framer.feed(chunk))
            if waiting:
                await sink.wait_written()  # type: ignore[attr-defined]
            chunks += 1
            if chunks % CHUNKS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
    finally:
        with trio.CancelScope(shield=True):
            # Whatever is still buffered in the pipe was written by the program:
            # keep it even when the pump is being cancelled.
            _drain_nonblocking(read_fd, framer, sink)
            sink.write(framer.finish())
            if waiting:
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                    await sink.wait_written()  # type: ignore[attr-defined]
            trio.lowlevel.notify_closing(read_fd)
            os.close(read_fd)


def _drain_nonblocking(fd: int, framer: Framer, sink: LogSink) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError:  # BlockingIOError included: the pipe is empty
            return
        if not chunk:
            return
        sink.write(framer.feed(chunk))
