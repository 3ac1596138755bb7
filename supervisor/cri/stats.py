"""CPU and memory of a container: from its cgroup, or from /proc.

With a cgroup (v2): CPU from ``cpu.stat`` ``usage_usec`` (always there: it
counts every process of the tree, escaped daemons included); memory from
``memory.current`` and ``memory.stat`` (``anon`` as RSS, working set =
usage - ``inactive_file``, as the kubelet computes it) when the memory
controller is enabled. What the cgroup cannot tell comes from /proc: the
sum over the processes of the container's session (the program is a
session leader; its descendants stay in its session unless they call
setsid) of ``utime + stime`` and of RSS from ``/proc/PID/stat``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    """Cumulative CPU time and current memory of a container; ``source`` says from where."""

    cpu_ns: int
    memory_bytes: int
    working_set_bytes: int
    rss_bytes: int
    source: str


def _keyed(path: Path) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def cgroup_cpu(cgroup: Path) -> int | None:
    """CPU time (ns) of the cgroup directory ``cgroup``; None if it cannot be read."""
    try:
        return _keyed(cgroup / "cpu.stat")["usage_usec"] * 1000
    except (OSError, ValueError, KeyError):
        return None


def cgroup_memory(cgroup: Path) -> tuple[int, int, int] | None:
    """Usage, working set and RSS of ``cgroup``; None without the memory controller."""
    try:
        current = int((cgroup / "memory.current").read_text())
        memory = _keyed(cgroup / "memory.stat")
    except (OSError, ValueError):
        return None
    working_set = max(0, current - memory.get("inactive_file", 0))
    return current, working_set, memory.get("anon", 0)


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: cut at the last ')'.
    return text[text.rfind(")") + 2 :].split()


def from_proc(session: int) -> Usage:
    """Usage summed over the live processes whose session id is ``session``."""
    cpu = rss = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        # After the name: state(0) ppid(1) pgrp(2) session(3) ... utime(11) stime(12) ... rss(21)
        if fields is None or len(fields) < 22 or int(fields[3]) != session:
            continue
        cpu += (int(fields[11]) + int(fields[12])) * _TICK_NS
        rss += int(fields[21]) * _PAGE
    return Usage(cpu, rss, rss, rss, "proc")


def usage(cgroup: str | None, pid: int | None) -> Usage | None:
    """The running container's usage (see the module docstring); None without a pid."""
    if pid is None:
        return None
    cpu = cgroup_cpu(Path(cgroup)) if cgroup else None
    memory = cgroup_memory(Path(cgroup)) if cgroup else None
    if cpu is not None and memory is not None:
        return Usage(cpu, *memory, source="cgroup")
    proc = from_proc(pid)
    if cpu is None and memory is None:
        return proc
    if cpu is not None:
        return Usage(cpu, proc.memory_bytes, proc.working_set_bytes, proc.rss_bytes, "cgroup+proc")
    assert memory is not None
    return Usage(proc.cpu_ns, *memory, source="proc+cgroup")
