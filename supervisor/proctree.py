"""Process trees from /proc: subreaper, members of a program's tree, strays.

Used where a program has no cgroup (cgroup v2 not writable): its tree is
its session (each program is a session leader) plus every descendant of a
member, found by ``ppid`` links. A process is identified across time by
(pid, start time): a recorded pid whose start time differs was reused and
is left alone. Nothing here is async.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_libc = ctypes.CDLL(None, use_errno=True)


def set_child_subreaper(on: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants (or not); return the old setting."""
    old = ctypes.c_int(0)
    if _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0) != 0 or (
        _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0
    ):
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return bool(old.value)


@dataclass(frozen=True)
class ProcInfo:
    """A few fields of ``/proc/PID/stat``."""

    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    start_time: int  # clock ticks since boot


def stat(pid: int) -> ProcInfo | None:
    """``/proc/PID/stat`` of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    # fields after comm: state ppid pgrp session tty_nr tpgid flags minflt
    # cminflt majflt cmajflt utime stime cutime cstime priority nice
    # num_threads itrealvalue starttime
    return ProcInfo(pid, rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]))


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    info = stat(pid)
    return None if info is None else info.start_time


def all_processes() -> list[ProcInfo]:
    """Every process visible in /proc."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := stat(int(name))) is not None:
            found.append(info)
    return found


def tree(sid: int, *, since: int = 0, processes: Iterable[ProcInfo] | None = None) -> list[int]:
    """Members of session ``sid`` and all their descendants started at or after ``since``."""
    procs = [p for p in (processes if processes is not None else all_processes())]
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found: dict[int, ProcInfo] = {
        p.pid: p for p in procs if p.sid == sid and p.start_time >= since and p.state != "Z"
    }
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.pid not in found and child.state != "Z":
                found[child.pid] = child
                todo.append(child.pid)
    return sorted(found)


def kill_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``, ignoring those that are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_if_same(pid: int, recorded_start: int, sig: int = signal.SIGKILL) -> bool:
    """Kill ``pid`` only if it is still the process that started at ``recorded_start``."""
    if start_time(pid) != recorded_start:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
        return True
    return False


def children() -> list[int]:
    """The children of this process (all its threads), from /proc/self/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            found.extend(int(pid) for pid in f.read().split())
    return found


def reap_strays(known: set[int]) -> tuple[list[int], list[int]]:
    """Reap zombie children that are not in ``known``; return (reaped, alive strays).

    Strays are orphans the subreaper adopted: descendants of programs whose
    parent died. ``known`` are the children whose exit someone else waits for.
    Children in this process's own session are never strays: programs run in
    sessions of their own, an embedding program's other children usually not.
    """
    reaped, alive = [], []
    own_session = os.getsid(0)
    for pid in children():
        if pid in known:
            continue
        info = stat(pid)
        if info is None or info.sid == own_session:
            continue
        if info.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
        else:
            alive.append(pid)
    return reaped, alive


#: Clock ticks per second, for start times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def boot_id() -> str:
    """This boot's id: recorded pids mean nothing after a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
