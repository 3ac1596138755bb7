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
:class:`LogSink`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

DEFAULT_MAX_LINE = 16384
READ_SIZE = 65536


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
    """

    stream: str
    max_line: int = DEFAULT_MAX_LINE
    _pending: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._too_long = re.compile(rb"[^\n]{%d}" % (self.max_line + 1))

    def feed(self, chunk: bytes, ns: int | None = None) -> bytes:
        """Records for every complete line of ``chunk`` (and any over-long prefix)."""
        if not chunk:
            return b""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._pending = data
            return self._cut_long_tail(ns)
        lines, self._pending = data[: end + 1], data[end + 1 :]
        full = self._prefix(b"F", ns)
        if self._too_long.search(lines) is None:
            # The hot path: one prefix per line with C-level replace, no Python loop.
            out = full + lines[:-1].replace(b"\n", b"\n" + full) + b"\n"
        else:
            out = b"".join(self._long_line(line, full, ns) for line in lines[:-1].split(b"\n"))
        return out + self._cut_long_tail(ns)

    def finish(self, ns: int | None = None) -> bytes:
        """The record for an unterminated tail (``P``), if any."""
        tail, self._pending = self._pending, b""
        return self._prefix(b"P", ns) + tail + b"\n" if tail else b""

    def _prefix(self, tag: bytes, ns: int | None) -> bytes:
        return timestamp(ns) + b" " + self.stream.encode() + b" " + tag + b" "

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


class FdSink:
    """Appends records to an fd (a file opened O_APPEND, or capvisor's stdout).

    A write error (the reader of capvisor's stdout went away: EPIPE) does not
    stop supervision: it is reported once through ``on_error`` and later
    records are dropped, so the program's pipes keep draining and it never
    blocks on them. (Recovering from ENOSPC is the logs issue's.)
    """

    def __init__(self, fd: int, on_error: Callable[[OSError], None] | None = None) -> None:
        self.fd = fd
        self.error: OSError | None = None
        self._on_error = on_error

    @classmethod
    def open(cls, path: str, on_error: Callable[[OSError], None] | None = None) -> FdSink:
        """A sink appending to ``path``, created 0640 if missing."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return cls(os.open(path, flags, 0o640), on_error)

    def write(self, records: bytes) -> None:
        if self.error is not None:
            return
        view = memoryview(records)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.error = exc
            if self._on_error is not None:
                self._on_error(exc)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


async def pump(
    read_fd: int, stream: str, sink: LogSink, *, max_line: int = DEFAULT_MAX_LINE
) -> None:
    """Read ``read_fd`` to end of file, writing CRI records to ``sink``.

    Takes ownership of ``read_fd`` and closes it. Returns at EOF (every
    writer, including grandchildren, closed the pipe) or when cancelled;
    either way the unterminated tail is written before returning.
    """
    framer = Framer(stream, max_line)
    pipe = trio.lowlevel.FdStream(read_fd)
    try:
        while True:
            chunk = await pipe.receive_some(READ_SIZE)
            if not chunk:
                break
            sink.write(framer.feed(chunk))
    finally:
        with trio.CancelScope(shield=True):
            # Whatever is still buffered in the pipe was written by the program:
            # keep it even when the pump is being cancelled.
            _drain_nonblocking(read_fd, framer, sink)
            sink.write(framer.finish())
            await pipe.aclose()


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
