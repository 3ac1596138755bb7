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


# ---------------------------------------------------------------------------
# For the tests: the same through capvisor's own spawn path.


def spawn_under(
    bpf: bytes | None,
    argv: list[str],
    *,
    stdin: bytes = b"",
    extra_fds: tuple[int, ...] = (),
    timeout: float = 60.0,
    listener: bool = False,
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` (a path first) under ``bpf`` with :func:`supervisor.native.spawn`.

    The child gets stdin, stdout and stderr pipes and ``extra_fds`` as fds 3,
    4, ...; no Landlock, no rlimits. Returns ``(status, stdout, stderr)``
    where status is the exit code, or minus the signal that killed it.
    ``listener`` asks for a seccomp listener, which is closed unanswered
    (for tests of the hand-over only).
    """
    import select
    import time

    from supervisor import native

    pipes = [os.pipe() for _ in range(3)]
    child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
    request = native.SpawnRequest(
        path=argv[0],
        argv=argv,
        env=["PATH=/usr/bin:/bin", "LC_ALL=C"],
        fds=[*child_ends, *extra_fds],
        new_session=True,
        seccomp_bpf=bpf,
        seccomp_listener=listener,
    )
    try:
        child = native.spawn(request)
    finally:
        for fd in child_ends:
            os.close(fd)
    if child.listener >= 0:
        os.close(child.listener)
    os.write(pipes[0][1], stdin)
    os.close(pipes[0][1])
    names = {pipes[1][0]: "out", pipes[2][0]: "err"}
    got = {"out": bytearray(), "err": bytearray()}
    deadline = time.monotonic() + timeout
    try:
        while names:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select(list(names), [], [], left)
            if not readable:
                os.kill(child.pid, 9)
                raise TimeoutError(f"{argv} did not finish in {timeout} s")
            for fd in readable:
                data = os.read(fd, 65536)
                if data:
                    got[names[fd]] += data
                else:
                    os.close(fd)
                    del names[fd]
    finally:
        for fd in names:
            os.close(fd)
        status = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        os.close(child.pidfd)
    code = status.si_status if status.si_code == os.CLD_EXITED else -status.si_status
    return code, bytes(got["out"]), bytes(got["err"])
