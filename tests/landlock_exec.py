"""Test helper: run a command under an inherited Landlock ruleset fd.

Usage: ``python tests/landlock_exec.py RULESET_FD -- CMD [ARGS...]``

Sets no_new_privs, calls ``landlock_restrict_self(RULESET_FD, 0)``, closes
the fd and execs CMD (a path; argv[0] is CMD). This stands in for the native
helper's Landlock step in tests. Exit codes: 125 for a failure here (message
on stderr), 126 when execv fails with EACCES/ENOEXEC, 127 when CMD does not
exist; otherwise CMD's own.

Tests import :func:`run` from here (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_RESTRICT_SELF = 446


def run(
    ruleset_fd: int,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` under the ruleset; text output captured; ``env`` defaults to empty."""
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(ruleset_fd), "--", *cmd],
        pass_fds=(ruleset_fd,),
        capture_output=True,
        text=True,
        env=dict(env or {}),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(f"usage: {argv[0]} RULESET_FD -- CMD [ARGS...]", file=sys.stderr)
        return 125
    fd = int(argv[1])
    cmd = argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        print(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    if libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd), 0) != 0:
        print(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    os.close(fd)
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        print(f"execv {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126
    return 125  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
