"""``capvisor logs FILE|NAME [-f] [--since TIME] [--tail N] [--stream S] [--timestamps]``.

Prints the content of a CRI-format log file (capvisor's or kubelet's), ``P``
records joined into whole lines: stdout lines on standard output, stderr
lines on standard error, each optionally prefixed by its timestamp.

``--reopen`` instead signals (SIGHUP) the ``capvisor run`` processes writing
FILE to reopen it, for after FILE was renamed (see docs/logs.md).

Exit codes:
  0    all printed (``--reopen``: at least one process signalled)
  1    some lines of the file are not CRI records (each reported as
       ``FILE:LINE:1: …`` on standard error; the rest is printed)
  125  the file cannot be read (``--reopen``: no capvisor run writes it)
  2    bad command line
  130  interrupted (``-f`` ends with Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from .description import parse_duration
from .errors import CapvisorError
from .logread import (
    STREAMS,
    Joiner,
    Line,
    Malformed,
    follow,
    locate,
    parse_timestamp,
    read_lines,
    tail_lines,
)
from .logwriters import writers_of

EXIT_MALFORMED = 1

NameLookup = Callable[[str], Path | None]


def register(commands: argparse._SubParsersAction, lookup: NameLookup | None = None) -> None:  # type: ignore[type-arg]
    """Add ``logs`` to the ``capvisor`` subcommands; ``lookup`` maps program names to files."""
    logs = commands.add_parser(
        "logs",
        help="print a CRI-format log file (P records joined into lines)",
        description="Print the lines of a CRI-format log file, ours or kubelet's.",
    )
    logs.add_argument("target", metavar="FILE|NAME", help="a log file (names: see docs/logs.md)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "--since",
        metavar="TIME",
        type=_since,
        help="only lines from TIME on: RFC 3339 (2026-11-23T10:55:11Z) or an age (10s, 5m, 2h)",
    )
    logs.add_argument("--tail", metavar="N", type=_count, help="only the last N lines")
    logs.add_argument("--stream", choices=STREAMS, help="only this stream")
    logs.add_argument(
        "--timestamps", action="store_true", help="prefix each line with its timestamp"
    )
    logs.add_argument(
        "--reopen",
        action="store_true",
        help="make the capvisor run processes writing FILE reopen it (after you renamed it)",
    )
    logs.set_defaults(handler=lambda args: run_logs(args, lookup))


def _since(text: str) -> int:
    stamp = parse_timestamp(text)
    if stamp is not None:
        return stamp
    age = parse_duration(text)
    if age is None:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time or an age such as 10m: {text!r}")
    return time.time_ns() - int(age * 1e9)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a number of lines: {text!r}")
    return int(text)


def run_logs(args: argparse.Namespace, lookup: NameLookup | None = None) -> int:
    """The ``logs`` handler; returns the exit code."""
    path = locate(args.target, lookup)
    if args.reopen:
        return _reopen(path)
    streams = (args.stream,) if args.stream else STREAMS
    joiner = Joiner(str(path), streams, args.since)
    printer = _Printer(args.timestamps)
    try:
        with open(path, "rb") as f:  # one open file from the first line read to the last
            end = 0
            if args.tail is not None:
                items, end = tail_lines(f, joiner, args.tail, tails=not args.follow)
                printer.show(items)
            elif not args.follow:
                printer.show(read_lines(f, joiner))
            if args.follow:
                for batch in follow(path, joiner, start=end, file=f):
                    printer.show(batch)
    except BrokenPipeError:
        # The reader of our output went away (| head): done, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        return 0
    except OSError as exc:
        raise CapvisorError(f"{path}: {exc.strerror}") from exc
    return EXIT_MALFORMED if printer.malformed else 0


def _reopen(path: Path) -> int:
    pids = writers_of(path)
    if not pids:
        raise CapvisorError(f"{path}: no capvisor run process is writing this log")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
    print(f"capvisor: asked {len(pids)} process(es) to reopen {path}: {' '.join(map(str, pids))}")
    return 0


class _Printer:
    def __init__(self, timestamps: bool) -> None:
        self.timestamps = timestamps
        self.malformed = 0
        self.out: dict[str, BinaryIO] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}

    def show(self, items: Iterable[Line | Malformed]) -> None:
        for item in items:
            if isinstance(item, Malformed):
                self.malformed += 1
                sys.stderr.buffer.write(f"capvisor: {item}\n".encode())
                continue
            out = self.out[item.stream]
            if self.timestamps:
                out.write(item.timestamp + b" ")
            out.write(item.content)
        for out in self.out.values():
            out.flush()
