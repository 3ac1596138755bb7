"""cgroup v2 per program: placement, ``memory``/``pids`` limits, ``cgroup.kill``.

:func:`probe` finds the cgroup v2 hierarchy (a pure v2 mount or the
``unified`` one of a hybrid setup) and this process's cgroup in it, and
checks that a child cgroup can be created there. When it cannot (no v2, not
writable, as an unprivileged user without delegation) :class:`Support`
says why, and the service reports that in each program's confinement
report instead of ignoring the limits.

Layout: ``<our cgroup>/capvisor-<instance>/<container id>``. The child moves
itself into its cgroup before anything else (native step "cgroup"), so
every descendant is in it from the start: ``cgroup.kill`` stops the whole
tree, escaped daemons included.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Support:
    """Whether programs get cgroups: ``base`` is set when they do, ``reason`` says why not."""

    base: Path | None
    controllers: frozenset[str] = frozenset()
    reason: str = ""
    missing: dict[str, str] = field(default_factory=dict)  # limit -> why it cannot be applied


def _mount_point() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4])
    return None


def _own_cgroup() -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def probe(instance: str) -> Support:
    """Find or create ``<our cgroup>/capvisor-<instance>`` and enable what can be enabled."""
    try:
        mount = _mount_point()
        own = _own_cgroup()
    except OSError as exc:
        return Support(None, reason=f"cannot read /proc: {exc.strerror}")
    if mount is None or own is None:
        return Support(None, reason="no cgroup v2 hierarchy is mounted")
    parent = mount / own.lstrip("/")
    base = parent / f"capvisor-{instance}"
    try:
        base.mkdir(exist_ok=True)
        if not (base / "cgroup.kill").exists():
            return Support(None, reason=f"{base}: no cgroup.kill (Linux 5.14+ needed)")
    except OSError as exc:
        return Support(None, reason=f"cgroup v2 at {parent} is not writable: {exc.strerror}")
    available = set(_words(base / "cgroup.controllers"))
    wanted = {"memory", "pids"}
    missing: dict[str, str] = {}
    for name in sorted(wanted):
        if name not in available:
            where = parent if name not in set(_words(parent / "cgroup.controllers")) else base
            missing[name] = f"the {name} controller is not available in {where}"
            continue
        try:
            (base / "cgroup.subtree_control").write_text(f"+{name}")
        except OSError as exc:
            missing[name] = f"cannot enable {name} in {base}: {exc.strerror}"
    enabled = frozenset(set(_words(base / "cgroup.subtree_control")))
    return Support(base, controllers=enabled, missing=missing)


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


#: What each description limit writes.
LIMIT_FILES = {"memory": "memory.max", "pids": "pids.max"}


class Cgroup:
    """One program's cgroup directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls, support: Support, name: str, limits: dict[str, int]
    ) -> tuple[Cgroup, list[str]]:
        """Make the cgroup ``name`` under ``support.base`` and apply ``limits``.

        Returns the cgroup and the limits that could not be applied, each
        with the reason (for the confinement report). Raises OSError if the
        directory cannot be made.
        """
        assert support.base is not None
        path = support.base / name
        if path.exists():
            cls(path).remove()
        path.mkdir(parents=True)  # the base too, should someone have removed it
        group = cls(path)
        skipped = []
        for key, value in limits.items():
            if key in support.missing:
                skipped.append(f"limits.{key}: {support.missing[key]}")
                continue
            text = "max" if value < 0 else str(value)
            try:
                (path / LIMIT_FILES[key]).write_text(text)
            except OSError as exc:
                skipped.append(f"limits.{key}: cannot write {LIMIT_FILES[key]}: {exc.strerror}")
        if "memory" in limits and "memory" not in support.missing:
            with contextlib.suppress(OSError):  # kill the whole program on OOM, not one task
                (path / "memory.oom.group").write_text("1")
        return group, skipped

    def open_procs(self) -> int:
        """An O_WRONLY fd of ``cgroup.procs`` for the child to move itself in (caller closes)."""
        return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def pids(self) -> list[int]:
        """The processes in the cgroup."""
        return [int(p) for p in _words(self.path / "cgroup.procs")]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process in the cgroup."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL everything in the cgroup (``cgroup.kill``), forks in flight included."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / "cgroup.kill").write_text("1")

    def populated(self) -> bool:
        """Whether any process is left (``cgroup.events``)."""
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in events

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed something here (``memory.events``)."""
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self, *, wait: float = 2.0) -> bool:
        """Kill what is left and remove the directory; False if it could not be removed."""
        if not self.path.exists():
            return True
        self.kill()
        deadline = time.monotonic() + wait
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
            time.sleep(0.005)


def kill_leftover(path: str) -> None:
    """At restart: kill and remove a recorded cgroup that may still hold processes."""
    Cgroup(path).remove()
