"""Log sinks that write to fds and files: full disks, reopen and rotation.

:class:`FdSink` appends records to an fd (capvisor's standard output, or a
file). It never loses records to a transient error: when a write fails with
ENOSPC, EDQUOT, EIO or the like, the unwritten bytes are kept (at most one
read batch per stream), a ``write-failed`` :class:`LogEvent` is reported, and
the pump stops reading the pipe until :meth:`FdSink.wait_written` gets them
out, retrying with a backoff of 50 ms up to 1 s. Meanwhile the program keeps
running and blocks only when it writes to its full pipe. A write cut short in
the middle of a record is truncated back to the last whole record (regular
files), so a file never ends in a torn record. Only EPIPE and EBADF
(the reader of capvisor's output went away) are final: reported once, the
further output is dropped so the program never blocks on it.

:class:`LogFile` is an :class:`FdSink` on a path, with :meth:`LogFile.reopen`
(after the file was renamed: kubelet's ReopenContainerLog, SIGHUP) and
optional size rotation. Switching files happens only between whole records,
so no record is split, lost or written twice.

Rotation (``max_size``, ``max_files``): before a batch would make the file
larger than ``max_size`` bytes, the records that still fit are written, the
file is renamed to ``PATH.YYYYMMDD-HHMMSS`` (UTC; ``.1``, ``.2``... appended
within one second, so names sort in the order they were written) and a new
``PATH`` is started; of the rotated files only the newest ``max_files - 1``
are kept. A single record larger than ``max_size`` gets a file of its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

#: Errors after which writing again cannot help: the output is dropped.
FINAL_ERRNOS = frozenset({errno.EPIPE, errno.EBADF})
RETRY_MIN = 0.05
RETRY_MAX = 1.0
#: The most buffers one writev(2) takes (Linux: 1024).
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: kubelet's defaults (containerLogMaxFiles); a rotated set needs at least 2.
DEFAULT_MAX_FILES = 5

EventKind = Literal[
    "write-failed", "write-resumed", "dropped", "lost", "rotated", "rotate-failed", "reopen-failed"
]


@dataclass(frozen=True)
class LogEvent:
    """Something that happened to a log sink, for the supervisor to report."""

    kind: EventKind
    where: str
    error: OSError | None = None
    detail: str = ""

    def __str__(self) -> str:
        why = f": {self.error.strerror}" if self.error is not None else ""
        match self.kind:
            case "write-failed":
                return (
                    f"writing the log to {self.where} failed{why}; the program's output waits "
                    "(it blocks when its pipe is full) until the log can be written again"
                )
            case "write-resumed":
                return f"writing the log to {self.where} again ({self.detail})"
            case "dropped":
                return (
                    f"writing the log to {self.where} failed{why}; "
                    "the program keeps running, its further output is dropped"
                )
            case "lost":
                return (
                    f"{self.detail} bytes of log records could not be written to {self.where} "
                    "before it was closed and are lost"
                )
            case "rotated":
                return f"log {self.where} rotated to {self.detail}"
            case "reopen-failed":
                return f"reopening the log {self.where} failed{why}; still writing the old file"
            case "rotate-failed":
                if self.detail:
                    return f"rotating the log {self.where}: removing {self.detail} failed{why}"
                return f"rotating the log {self.where} failed{why}; it grows past max_size"
        return f"{self.kind}: {self.where}{why}"  # pragma: no cover


EventHandler = Callable[[LogEvent], None]


def rotated_files(path: str | os.PathLike[str]) -> list[Path]:
    """The rotated files of the log ``path`` (``PATH.YYYYMMDD-HHMMSS[.N]``), oldest first."""
    return [p for _, p in _rotated(path)]


def _rotated(path: str | os.PathLike[str]) -> list[tuple[tuple[str, int], Path]]:
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.(\d{8}-\d{6})(?:\.(\d+))?")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append(((match[1], int(match[2] or 0)), path.parent / name))
    return sorted(found)


class FdSink:
    """Appends whole records to an fd it owns; a :class:`~supervisor.logs.WaitingSink`.

    ``write`` never blocks on a failing destination and never raises for I/O
    errors: those become events (see the module docstring).
    """

    def __init__(
        self, fd: int, *, on_event: EventHandler | None = None, where: str = "standard output"
    ) -> None:
        self.fd = fd
        self.where = where
        #: The final error after which output is dropped, if one happened.
        self.error: OSError | None = None
        self._on_event = on_event
        self._backlog: deque[bytes] = deque()
        self._offset = 0  # bytes of _backlog[0] already written
        self._failing: OSError | None = None
        self._failed_at = 0.0

    @classmethod
    def open(cls, path: str, *, on_event: EventHandler | None = None) -> LogFile:
        """A :class:`LogFile` appending to ``path`` (no rotation); raises OSError."""
        return LogFile(path, on_event=on_event)

    @property
    def pending(self) -> int:
        """Bytes given to :meth:`write` and not written yet."""
        return sum(map(len, self._backlog)) - self._offset

    def write(self, records: bytes) -> None:
        """Write ``records`` now, or keep what cannot be written yet."""
        if self.error is not None or not records:
            return
        self._backlog.append(records)
        if len(self._backlog) == 1:
            self._flush()

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """``write(b"".join(parts))``, without the copy: one ``writev`` when it can.

        The pump's hot path. Falls back to :meth:`write` on the joined bytes
        when records already wait, when the file must change first (reopen,
        rotation) or for more than :data:`IOV_MAX` parts; a short or failed
        ``writev`` keeps the rest exactly as :meth:`write` would.
        """
        if self.error is not None:
            return
        total = sum(map(len, parts))
        if not total:
            return
        if self._backlog or len(parts) > IOV_MAX or not self._direct(total):
            self.write(b"".join(parts))
            return
        try:
            written = self._writev(parts)
        except OSError as exc:
            self._backlog.append(b"".join(parts))
            self._failed(exc)
            return
        if written < total:  # the rest as write() would keep it (whole records)
            self._backlog.append(b"".join(parts))
            self._offset = written
            self._flush()

    async def wait_written(self) -> None:
        """Retry until everything written so far is out (or dropped after a final error).

        Cancellation leaves the unwritten records in place, still whole.
        """
        delay = RETRY_MIN
        while self._backlog:
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            self._flush()

    def close(self) -> None:
        """Close the fd; records not written by now are lost (a ``lost`` event)."""
        if self.pending:
            self._event("lost", detail=str(self.pending))
            self._backlog.clear()
            self._offset = 0
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _flush(self) -> None:
        while self._backlog:
            data = self._backlog[0]
            try:
                self._offset += self._write_some(data, self._offset)
            except OSError as exc:
                if self._offset and data[self._offset - 1] != 0x0A:
                    # An earlier short write (the disk filled up) tore a record:
                    # cut the torn part off the file; it is written whole later.
                    whole = data.rfind(b"\n", 0, self._offset) + 1
                    if self._untear(self._offset - whole):
                        self._offset = whole
                self._failed(exc)
                return
            if self._offset >= len(data):
                self._backlog.popleft()
                self._offset = 0
        if self._failing is not None:
            waited = time.monotonic() - self._failed_at
            self._failing = None
            self._event("write-resumed", detail=f"after {waited:.1f} s, nothing lost")

    def _write_some(self, data: bytes, offset: int) -> int:
        return os.write(self.fd, memoryview(data)[offset:])

    def _direct(self, size: int) -> bool:
        """Whether ``size`` bytes of records may go to ``fd`` as they are."""
        return True

    def _writev(self, parts: Sequence[bytes | memoryview]) -> int:
        return os.writev(self.fd, parts)

    def _untear(self, torn: int) -> bool:
        """Truncate ``torn`` bytes off the end of a regular file; False if not possible."""
        try:
            size = os.fstat(self.fd)
            if not stat.S_ISREG(size.st_mode):
                return False
            os.ftruncate(self.fd, size.st_size - torn)
        except OSError:
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        if exc.errno in FINAL_ERRNOS:
            self.error = exc
            self._backlog.clear()
            self._offset = 0
            self._event("dropped", exc)
        elif self._failing is None:
            self._failing = exc
            self._failed_at = time.monotonic()
            self._event("write-failed", exc)

    def _event(self, kind: EventKind, error: OSError | None = None, detail: str = "") -> None:
        if self._on_event is not None:
            self._on_event(LogEvent(kind, self.where, error, detail))


class LogFile(FdSink):
    """An :class:`FdSink` on ``path``: reopen and size rotation.

    Opens (creating 0640, appending) at once; raises OSError if it cannot.
    ``max_size`` None means no rotation.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_size: int | None = None,
        max_files: int = DEFAULT_MAX_FILES,
        on_event: EventHandler | None = None,
    ) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError("max_size must be positive")
        if max_files < 2:
            raise ValueError("max_files must be at least 2 (the current file and one rotated)")
        self.path = os.fspath(path)
        self.max_size = max_size
        self.max_files = max_files
        super().__init__(self._open(), on_event=on_event, where=self.path)
        self._size = os.fstat(self.fd).st_size
        self._next_fd = -1  # opened by reopen(), used from the next record boundary
        self._rotate_error: int | None = None

    def reopen(self) -> None:
        """Write the next records to a file newly opened at ``path``.

        For after the file was renamed or removed. Takes effect at once, or,
        when records wait for a full disk, before the next of them is written.
        Raises OSError if ``path`` cannot be opened; the old file stays in use.
        """
        fd = self._open()
        if self._next_fd >= 0:
            os.close(self._next_fd)
        self._next_fd = fd
        if not self._backlog:
            self._switch()

    def close(self) -> None:
        if self._next_fd >= 0:
            os.close(self._next_fd)
            self._next_fd = -1
        super().close()

    def rotated_files(self) -> list[Path]:
        """The rotated files of ``path``, oldest first."""
        return rotated_files(self.path)

    def _rotated(self) -> list[tuple[tuple[str, int], Path]]:
        return _rotated(self.path)

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.path, flags, 0o640)

    def _switch(self) -> None:
        fd, self._next_fd = self._next_fd, -1
        os.close(self.fd)
        self.fd = fd
        self._size = os.fstat(fd).st_size

    def _write_some(self, data: bytes, offset: int) -> int:
        end = len(data)
        if offset == 0 or data[offset - 1] == 0x0A:  # between records: may change files
            if self._next_fd >= 0:
                self._switch()
            if self.max_size is not None:
                end = self._fit(data, offset)
        written = os.write(self.fd, memoryview(data)[offset:end])
        self._size += written
        return written

    def _direct(self, size: int) -> bool:
        # Not when a reopened file waits or the records would need a rotation.
        return self._next_fd < 0 and (self.max_size is None or self._size + size <= self.max_size)

    def _writev(self, parts: Sequence[bytes | memoryview]) -> int:
        written = os.writev(self.fd, parts)
        self._size += written
        return written

    def _untear(self, torn: int) -> bool:
        if not super()._untear(torn):
            return False
        self._size -= torn
        return True

    def _fit(self, data: bytes, offset: int) -> int:
        """Where the part of ``data[offset:]`` for the current file ends."""
        assert self.max_size is not None
        room = self.max_size - self._size
        if len(data) - offset <= room:
            return len(data)
        cut = data.rfind(b"\n", offset, offset + max(room, 0)) + 1
        if cut > offset:
            return cut  # the whole records that fit; the next call rotates
        if self._size > 0:
            if not self._rotate():
                return len(data)
            return self._fit(data, offset)
        return data.find(b"\n", offset) + 1 or len(data)  # one record alone is too big

    def _rotate(self) -> bool:
        try:
            target = self._rotated_name()
            current = os.fstat(self.fd)
            try:
                here = os.stat(self.path)
            except FileNotFoundError:
                here = None
            if here is not None and (here.st_dev, here.st_ino) == (current.st_dev, current.st_ino):
                os.rename(self.path, target)
            else:
                target = "(already moved away)"
            self._next_fd = self._open()
        except OSError as exc:
            if exc.errno != self._rotate_error:
                self._rotate_error = exc.errno
                self._event("rotate-failed", exc)
            return False
        self._rotate_error = None
        self._switch()
        self._prune()
        self._event("rotated", detail=target)
        return True

    def _rotated_name(self) -> str:
        """``PATH.STAMP`` or ``PATH.STAMP.N``, sorting after every rotated file."""
        key = (time.strftime("%Y%m%d-%H%M%S", time.gmtime()), 0)
        existing = self._rotated()
        if existing and existing[-1][0] >= key:  # same second (or the clock went back)
            key = (existing[-1][0][0], existing[-1][0][1] + 1)
        return f"{self.path}.{key[0]}" + (f".{key[1]}" if key[1] else "")

    def _prune(self) -> None:
        old = self.rotated_files()
        for path in old[: max(0, len(old) - (self.max_files - 1))]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._event("rotate-failed", exc, detail=str(path))


@contextlib.asynccontextmanager
async def reopen_on_signals(
    sink: LogFile, signals: Sequence[int] = (signal.SIGHUP,)
) -> AsyncIterator[None]:
    """Within the block, each of ``signals`` (SIGHUP) makes ``sink`` reopen its file.

    The signals are caught from entry on. A reopen that fails becomes a
    ``reopen-failed`` event and the old file stays in use. An exception of
    the block propagates as itself, not wrapped in an exception group.
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_reopen_loop, sink, signals)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _reopen_loop(
    sink: LogFile,
    signals: Sequence[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(*signals) as received:
        task_status.started()
        async for _ in received:
            try:
                sink.reopen()
            except OSError as exc:
                sink._event("reopen-failed", exc)
