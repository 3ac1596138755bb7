"""What every hostile-program test shares: the attack registry, the probe header, health checks.

Extension points for features still being built (switchboard, issue 5;
service, issue 6; CRI, issue 7): register their attacks with :func:`attack`
like the rows here, and give ``docs/security.md`` a row for each;
``test_table.py`` keeps the two in step. :class:`Snapshot` is the leak check
the fuzzers and the fault tests use after every example.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..cri_log import records, stream_bytes

F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class Attack:
    """One row of docs/security.md: the attempt and the layer that stops it."""

    name: str
    mechanism: str


#: Every attack the battery runs, by test function name.
ATTACKS: dict[str, Attack] = {}


def attack(name: str, mechanism: str) -> Callable[[F], F]:
    """Register a test as the proof of one row of docs/security.md."""

    def register(test: F) -> F:
        ATTACKS[test.__name__] = Attack(name, mechanism)
        return test

    return register


#: Prepended to every hostile C program. ``TRY(name, expr)`` prints the name
#: and ``ok`` or the errno name, so a test can compare the whole transcript.
#: Following bubblewrap's try-syscall, probes that must tell seccomp from the
#: kernel pass arguments that make an allowed call fail harmlessly (EBADF,
#: EFAULT, EINVAL, ESRCH): only a filter answers EPERM to those.
PROBE_H = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static long report(const char *name, long r) {
    printf("%s %s\n", name, r < 0 ? strerrorname_np(errno) : "ok");
    fflush(stdout);
    return r;
}
#define TRY(name, expr) report(name, (long)(expr))
#define DONE() do { puts("done"); fflush(stdout); return 0; } while (0)
"""


@dataclass
class Outcome:
    """What a hostile program left: its exit code and its log, split into streams."""

    returncode: int
    log: bytes
    supervisor_stderr: str

    @property
    def lines(self) -> list[str]:
        return stream_bytes(self.log, "stdout").decode(errors="replace").splitlines()

    @property
    def stderr(self) -> str:
        return stream_bytes(self.log, "stderr").decode(errors="replace")

    def transcript(self) -> dict[str, str]:
        """``{"probe": "EPERM", ...}`` from the ``TRY`` lines."""
        return dict(line.split(" ", 1) for line in self.lines if " " in line)


def assert_healthy(outcome: Outcome, code: int) -> None:
    """The supervisor survived the attack: it reported the program's own status,
    wrote a well-formed log to the end, and printed no traceback."""
    assert outcome.returncode == code, (outcome.returncode, outcome.supervisor_stderr)
    assert "Traceback" not in outcome.supervisor_stderr, outcome.supervisor_stderr
    assert "internal error" not in outcome.supervisor_stderr, outcome.supervisor_stderr
    records(outcome.log)  # raises on the first malformed byte


_STATE = re.compile(r"^State:\s+(\S)", re.MULTILINE)


def children(pid: int | None = None) -> list[int]:
    """The pids of ``pid``'s (default: this process's) children, over all threads."""
    pid = pid or os.getpid()
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def zombies(pid: int | None = None) -> list[int]:
    """Those of ``pid``'s children that exited and were not reaped."""
    out = []
    for child in children(pid):
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            continue
        match = _STATE.search(status)
        if match and match[1] == "Z":
            out.append(child)
    return out


def open_fds(pid: int | None = None) -> dict[int, str]:
    """``{fd: what it points at}`` for ``pid`` (default: this process)."""
    base = f"/proc/{pid or 'self'}/fd"
    out = {}
    for name in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            out[int(name)] = os.readlink(f"{base}/{name}")
    return out


def rss_kib(pid: int | None = None) -> int:
    """Resident set size in KiB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]


@dataclass(frozen=True)
class Snapshot:
    """The resources a supervisor holds; compare two with :meth:`leaks`."""

    fds: dict[int, str]
    children: tuple[int, ...]

    @classmethod
    def take(cls, pid: int | None = None) -> Snapshot:
        return cls(open_fds(pid), tuple(children(pid)))

    def leaks(self, later: Snapshot) -> list[str]:
        """What ``later`` holds that this snapshot did not: fds and child processes."""
        problems = [
            f"fd {fd} -> {target}"
            for fd, target in sorted(later.fds.items())
            if self.fds.get(fd) != target
        ]
        problems += [f"child {pid}" for pid in later.children if pid not in self.children]
        return problems


class Hang(BaseException):
    """Raised by :func:`time_limit`; a BaseException so no ``except Exception`` eats it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fuzz_budget(ci: int) -> int:
    """Examples per fuzz test: ``ci`` by default, ``CAPVISOR_FUZZ_EXAMPLES`` for a long run."""
    return int(os.environ.get("CAPVISOR_FUZZ_EXAMPLES", ci))
