"""Test helper: run a command under a compiled seccomp program.

Usage: ``python seccomp_exec.py BPF_FILE -- CMD ARGS...``

Sets no_new_privs, installs the ``struct sock_filter`` array in BPF_FILE with
``seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)`` and execs CMD (a path; no
PATH search). The exec itself runs under the filter, so the filter must
allow execve. Exit status: 125 if the filter cannot be installed, 127 if
CMD cannot be executed, otherwise CMD's.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP = 317  # x86_64
SECCOMP_SET_MODE_FILTER = 1


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(bpf: bytes) -> None:
    """Install ``bpf`` on the calling thread; raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(program))
    result = libc.syscall(
        ctypes.c_long(SYS_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(0),
        ctypes.byref(fprog),
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp(SET_MODE_FILTER): {os.strerror(errno)}")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 125
    with open(argv[1], "rb") as file:
        bpf = file.read()
    try:
        install(bpf)
    except OSError as exc:
        print(f"seccomp_exec: {exc}", file=sys.stderr)
        return 125
    try:
        os.execv(argv[3], argv[3:])
    except OSError as exc:
        print(f"seccomp_exec: {argv[3]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
