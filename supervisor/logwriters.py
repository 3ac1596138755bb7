"""Finding the ``capvisor run`` processes that write a log file (``logs --reopen``).

A process qualifies when its command line is capvisor's (``capvisor run`` or
``python -m supervisor run``) and one of its fds is open for writing on
``PATH`` or on a file renamed from it in the same directory (``PATH.*``, as
after ``mv PATH PATH.1``). Processes of other users are invisible unless we
are root; nothing else is ever signalled.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")


def writers_of(path: str | os.PathLike[str]) -> list[int]:
    """Pids of the capvisor processes writing ``path`` (or its renamed self)."""
    target = Path(os.path.abspath(path))
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _is_capvisor_run(entry) and _writes(entry, target):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(found)


def _is_capvisor_run(proc: Path) -> bool:
    argv = (proc / "cmdline").read_bytes().split(b"\0")
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == b"capvisor" or (arg == b"supervisor" and i > 0 and argv[i - 1] == b"-m"):
            return b"run" in argv[i + 1 :]
    return False


def _writes(proc: Path, target: Path) -> bool:
    for fd in (proc / "fd").iterdir():
        try:
            link = Path(os.readlink(fd))
        except OSError:
            continue
        if link.parent != target.parent:
            continue
        if link.name != target.name and not link.name.startswith(target.name + "."):
            continue
        flags = _fd_flags(proc, fd.name)
        if flags is not None and flags & os.O_ACCMODE != os.O_RDONLY:
            return True
    return False


def _fd_flags(proc: Path, fd: str) -> int | None:
    try:
        for line in (proc / "fdinfo" / fd).read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    except OSError:
        return None
    return None
