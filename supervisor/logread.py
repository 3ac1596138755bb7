"""Reading CRI-format log files back (``capvisor logs``): records → lines.

Reads what :mod:`supervisor.logs` writes and what kubelet/containerd write:
``TIMESTAMP SP STREAM SP TAG SP CONTENT LF`` where TIMESTAMP is RFC 3339
(any number of fraction digits, ``Z`` or an offset), STREAM ``stdout`` or
``stderr``, TAG ``F`` or ``P``. The ``P`` records of a stream are joined with
the ``F`` that ends them into one :class:`Line` carrying the timestamp of its
first record. :class:`Joiner` is the pure core; :func:`read_lines`,
:func:`tail_lines` and :func:`follow` do the file I/O.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import Location
from .logfile import rotated_files

STREAMS = ("stdout", "stderr")
Source = Path | BinaryIO
_RECORD = re.compile(rb"(\S+) (stdout|stderr) ([FP])(?: (.*))?", re.DOTALL)
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
#: How often :func:`follow` looks at the file for new records and rotation.
POLL_INTERVAL = 0.1


@dataclass(frozen=True)
class Line:
    """One line as the program wrote it; ``content`` ends with ``\\n`` unless it
    is an unterminated tail."""

    timestamp: bytes
    stream: str
    content: bytes


@dataclass(frozen=True)
class Malformed:
    """A line of the file that is not a CRI record."""

    location: Location
    text: bytes

    def __str__(self) -> str:
        return f"{self.location}: not a CRI log record: {self.text[:80]!r}"


def parse_timestamp(text: bytes | str) -> int | None:
    """Nanoseconds since the epoch for an RFC 3339 timestamp, or None."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    if match[9]:
        offset = int(match[10]) * 3600 + int(match[11]) * 60
        seconds -= offset if match[9] == "+" else -offset
    fraction = int((match[7] or "").ljust(9, "0"))
    return seconds * 1_000_000_000 + fraction


@dataclass
class Joiner:
    """Turns records into lines; no I/O.

    ``streams`` selects which streams' lines come out; ``since`` (ns) drops
    lines whose first record is older. Malformed lines are reported, not
    fatal, with their line number in ``filename``.
    """

    filename: str
    streams: tuple[str, ...] = STREAMS
    since: int | None = None
    _pending: dict[str, tuple[bytes, list[bytes]]] = field(default_factory=dict, repr=False)

    def feed(self, data: bytes, first_line: int = 1) -> Iterator[Line | Malformed]:
        """Lines completed by the whole records in ``data`` (it must end with ``\\n``)."""
        for number, raw in enumerate(data.split(b"\n")[:-1], first_line):
            match = _RECORD.fullmatch(raw)
            if match is None:
                yield Malformed(Location(self.filename, number, 1), raw)
                continue
            stamp, stream, tag, content = match[1], match[2].decode(), match[3], match[4] or b""
            if stream not in self.streams:
                continue
            first, parts = self._pending.pop(stream, (stamp, []))
            parts.append(content)
            if tag == b"P":
                self._pending[stream] = (first, parts)
                continue
            line = Line(first, stream, b"".join(parts) + b"\n")
            if self._wanted(line):
                yield line

    def finish(self) -> Iterator[Line]:
        """The unterminated tails (``P`` records with no ``F`` yet), oldest first."""
        pending = sorted(self._pending.items(), key=lambda item: item[1][0])
        self._pending.clear()
        for stream, (first, parts) in pending:
            line = Line(first, stream, b"".join(parts))
            if self._wanted(line):
                yield line

    def forget_first_lines(self) -> None:
        """Drop the partial lines seen so far (they began before what was read)."""
        self._pending.clear()

    def _wanted(self, line: Line) -> bool:
        if self.since is None:
            return True
        stamp = parse_timestamp(line.timestamp)
        return stamp is None or stamp >= self.since


def read_lines(source: Source, joiner: Joiner) -> Iterator[Line | Malformed]:
    """Every line of ``source`` (a path, or a file open for reading, read from
    its current position), tails included. Raises OSError."""
    with _opened(source) as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    yield from joiner.feed(data[:end])
    if end < len(data):
        yield Malformed(Location(joiner.filename, data.count(b"\n") + 1, 1), data[end:])
    yield from joiner.finish()


def tail_lines(
    source: Source, joiner: Joiner, count: int, *, tails: bool = True, window: int = 64 * 1024
) -> tuple[list[Line | Malformed], int]:
    """The last ``count`` lines of ``source`` (a path or a file open for
    reading; with any malformed lines among them), and the offset just after
    the last whole record read.

    Reads backwards in growing windows rather than the whole file. With
    ``tails`` false, unterminated lines at the end are left out (a follower
    reading on from the offset gets them whole). Raises OSError.
    """
    with _opened(source) as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            start = max(0, size - window)
            f.seek(start)
            data = f.read(size - start)
            skip = 0 if start == 0 else data.find(b"\n") + 1
            body = data[skip : data.rfind(b"\n") + 1]
            probe = Joiner(joiner.filename, joiner.streams, joiner.since)
            items = list(probe.feed(body))
            if start > 0:
                # A line may have begun before the window: trust a stream's lines
                # only after its first complete record.
                items = _after_first_full(items)
            if start == 0 or sum(isinstance(i, Line) for i in items) > count:
                break
            window *= 4
        end = start + skip + len(body)
        if tails:
            items += probe.finish()
        else:
            joiner.forget_first_lines()
        if any(isinstance(i, Malformed) for i in items):
            first_line = _line_number(f, start + skip)
            items = [
                Malformed(Location(i.location.file, i.location.line - 1 + first_line, 1), i.text)
                if isinstance(i, Malformed)
                else i
                for i in items
            ]
    return _last_lines(items, count), end


def _after_first_full(items: list[Line | Malformed]) -> list[Line | Malformed]:
    seen: set[str] = set()
    kept: list[Line | Malformed] = []
    for item in items:
        if isinstance(item, Line) and item.stream not in seen:
            seen.add(item.stream)
            continue
        kept.append(item)
    return kept


def _last_lines(items: list[Line | Malformed], count: int) -> list[Line | Malformed]:
    out: list[Line | Malformed] = []
    if count <= 0:
        return [item for item in items if isinstance(item, Malformed)]
    for item in reversed(items):
        if isinstance(item, Line):
            if count == 0:
                break
            count -= 1
        out.append(item)
    return out[::-1]


def _line_number(f, offset: int) -> int:  # type: ignore[no-untyped-def]
    f.seek(0)
    newlines, left = 0, offset
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        newlines += block.count(b"\n")
        left -= len(block)
    return newlines + 1


def follow(
    path: Path,
    joiner: Joiner,
    *,
    start: int = 0,
    file: BinaryIO | None = None,
    poll: float = POLL_INTERVAL,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Iterable[Line | Malformed]]:
    """Batches of lines appended to ``path`` from byte ``start`` on, until ``stop()``.

    ``file``, if given, is ``path`` already open (as it was when the caller
    read its beginning): following goes on from that very file even if it
    was rotated meanwhile. It is closed at the end like the files opened here.

    Follows the file across rotation (renamed and recreated: the old file is
    read to its end first, then any rotated files written since, by name) and
    truncation (read again from the start; a torn record the writer cut off
    is read again when it is rewritten whole). An incomplete last record is
    held until its newline arrives. Raises OSError if ``path`` cannot be
    opened at first.
    """
    f = file if file is not None else open(path, "rb")  # noqa: SIM115 - closed in finally
    try:
        f.seek(start)
        held = b""
        line = 1
        while not stop():
            data = held + f.read()
            end = data.rfind(b"\n") + 1
            held = data[end:]
            if end:
                yield list(joiner.feed(data[:end], line))
                line += data.count(b"\n", 0, end)
                continue
            size = os.fstat(f.fileno()).st_size
            if size < f.tell():
                whole = f.tell() - len(held)
                if size >= whole:
                    f.seek(whole)  # a torn record was cut off (full disk): it comes again
                else:
                    f.seek(0)  # truncated: start over
                    line = 1
                held = b""
                continue
            replaced = _replaced(path, f)
            if replaced is not None:
                f.close()
                f, held, line = replaced, b"", 1
                continue
            time.sleep(poll)
    finally:
        f.close()


def _replaced(path: Path, f) -> object | None:  # type: ignore[no-untyped-def]
    """The file to read next when ``f`` was rotated away, else None.

    That is the rotated file written after ``f`` (``PATH.YYYYMMDD-HHMMSS[.N]``,
    when several rotations happened between two polls), else ``path`` itself.
    """
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return None  # rotated, the new file is not there yet
    mine = os.fstat(f.fileno())
    if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
        return None
    later = rotated_files(path)
    for i, rotated in enumerate(later):
        try:
            st = os.stat(rotated)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            later = later[i + 1 :]
            break
    else:
        later = []
    for candidate in [*later, path]:
        try:
            return open(candidate, "rb")  # owned by follow()
        except FileNotFoundError:
            continue
    return None


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with open(source, "rb") as f:
            yield f
    else:
        yield source


def locate(target: str, lookup: Callable[[str], Path | None] | None = None) -> Path:
    """The log file for ``target``: a path, or a name ``lookup`` maps to a file.

    Anything containing ``/`` or naming an existing file is a path; otherwise
    ``lookup`` (given by whoever knows program names, e.g. a service) is
    asked. Returns the path even if it does not exist (the caller reports).
    """
    if "/" in target or os.path.exists(target) or lookup is None:
        return Path(target)
    found = lookup(target)
    return found if found is not None else Path(target)
