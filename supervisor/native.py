"""Spawning a confined child: the typed API over the native helper.

:func:`spawn` turns a :class:`SpawnRequest` into a running child through
``native/spawn.c`` (built by cffi as :mod:`supervisor._native`). The child
runs the steps of :data:`STEPS` in order (DESIGN.md section 4): reset signal
dispositions and mask, place fds, chdir, setsid, set rlimits, no_new_privs,
Landlock, seccomp, execve. Everything is prepared here and in the parent;
the child only installs it.

The call blocks the calling thread until the child has exec'd or failed (a
short time that does not grow with the supervisor's memory) and releases the
GIL meanwhile; it is safe to call from several threads at once.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._native import ffi, lib
from .errors import SpawnError

#: The names of the spawn steps, in order; :attr:`SpawnError.step` is one of
#: them. "socketpair" and "clone" happen in the parent, the rest in the child.
STEPS: tuple[str, ...] = tuple(
    ffi.string(lib.cv_step_name(i)).decode() for i in range(lib.CV_STEP_COUNT)
)

#: The most instructions a classic BPF program (and so a seccomp filter) may have.
BPF_MAXINSNS = 4096
#: Bytes in one ``struct sock_filter`` instruction.
BPF_INSN_SIZE = 8
#: The flags of the child's sendmsg() that hands the seccomp listener over.
LISTENER_MSG_FLAGS: int = lib.CV_LISTENER_MSG_FLAGS

_RLIM_MAX = 2**64 - 1  # RLIM_INFINITY as the kernel sees it
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Rlimit:
    """One resource limit for the child.

    ``resource`` is a ``resource.RLIMIT_*`` constant; ``soft`` and ``hard``
    are limits or ``resource.RLIM_INFINITY``.
    """

    resource: int
    soft: int
    hard: int


@dataclass(frozen=True)
class SpawnRequest:
    """Everything needed to spawn one child.

    ``fds[i]`` is an fd of the caller placed at ``i`` in the child (-1 leaves
    ``i`` closed); the child gets exactly fds ``0 .. len(fds)-1`` and no
    other, whatever the caller's fds' close-on-exec flags. The caller keeps
    its own fds (and the ruleset fd) and closes them when it likes.
    ``argv`` and ``env`` items are ``str`` (encoded with the filesystem
    encoding) or ``bytes``; ``env`` items are ``KEY=VALUE``. ``seccomp_bpf``
    is a raw ``struct sock_filter`` array as exported by libseccomp's
    ``seccomp_export_bpf``, installed last before execve.
    """

    path: str
    argv: Sequence[str | bytes]
    env: Sequence[str | bytes]
    fds: Sequence[int]
    cwd: str | None = None
    new_session: bool = True
    rlimits: Sequence[Rlimit] = ()
    landlock_ruleset_fd: int = -1
    seccomp_bpf: bytes | None = None
    listen_pid: bool = False
    #: Install the filter with SECCOMP_FILTER_FLAG_NEW_LISTENER and return the
    #: listener (:attr:`SpawnedChild.listener`). The filter must let the
    #: child's own last calls through: see :mod:`supervisor.seccomp_notify`.
    seccomp_listener: bool = False
    #: An O_WRONLY fd of a cgroup v2 ``cgroup.procs``: the child moves itself
    #: into that cgroup first (step "cgroup"); -1: stay (service.py).
    cgroup_procs_fd: int = -1
    #: A signal the child gets when the spawning thread dies
    #: (PR_SET_PDEATHSIG, step "pdeathsig"); 0: none (service.py).
    parent_death_signal: int = 0


@dataclass(frozen=True)
class SpawnedChild:
    """A child that has exec'd its program.

    The caller owns ``pidfd`` (close-on-exec): wait on it, reap the child
    with ``os.waitid(os.P_PIDFD, pidfd, os.WEXITED)`` and close it. It also
    owns ``listener``, the seccomp notification fd (close-on-exec), when the
    request asked for one; -1 otherwise.
    """

    pid: int
    pidfd: int
    listener: int = -1


def spawn(request: SpawnRequest) -> SpawnedChild:
    """Start ``request``'s program in a new, confined child.

    Returns once the child has exec'd the program.

    Raises :class:`ValueError` for a malformed request (a NUL byte in a
    string, an empty argv, an fd below -1, an rlimit out of range, a seccomp
    program that is empty, too long or not whole instructions); nothing is
    spawned then. Raises :class:`~supervisor.errors.SpawnError` with the
    failing step (one of :data:`STEPS`), its errno and ``request.path`` when
    the child setup fails; the child has then been reaped and no fd is left
    open. A bad ``landlock_ruleset_fd`` fails at step "landlock".
    """
    keep: list[Any] = []  # cdata that must outlive the call
    args = ffi.new("struct cv_spawn_args *")
    args.path = _cstring(request.path, "path", keep)
    if not request.argv:
        raise ValueError("argv must not be empty")
    args.argv = _cstring_array(request.argv, "argv", keep)
    slots: list[Any] = []
    if request.listen_pid:
        # The child writes its pid into this entry's 21 spare bytes.
        slots.append(ffi.new("char[]", _LISTEN_PID + b"\0" * 21))
        keep.append(slots[0])
        args.listen_pid = slots[0]
    args.envp = _cstring_array(request.env, "env", keep, extra=slots)
    args.fds, args.nfds = _fd_array(request.fds, keep)
    args.cwd = ffi.NULL if request.cwd is None else _cstring(request.cwd, "cwd", keep)
    args.new_session = int(request.new_session)
    args.rlimits, args.nrlimits = _rlimit_array(request.rlimits, keep)
    args.landlock_ruleset_fd = _check_fd(request.landlock_ruleset_fd, "landlock_ruleset_fd")
    args.seccomp_bpf, args.seccomp_len = _bpf(request.seccomp_bpf, keep)
    if request.seccomp_listener and request.seccomp_bpf is None:
        raise ValueError("seccomp_listener needs a seccomp program")
    args.seccomp_listener = int(request.seccomp_listener)
    args.cgroup_procs_fd = _check_fd(request.cgroup_procs_fd, "cgroup_procs_fd")
    args.parent_death_signal = int(request.parent_death_signal)

    result = ffi.new("struct cv_spawn_result *")
    if lib.cv_spawn(args, result) != 0:
        raise SpawnError(STEPS[result.step], result.err, program=request.path)
    return SpawnedChild(pid=result.pid, pidfd=result.pidfd, listener=result.listener)


_LISTEN_PID = b"LISTEN_PID="


def _cstring(value: str | bytes, what: str, keep: list[Any]) -> Any:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    owned = ffi.new("char[]", raw)
    keep.append(owned)
    return owned


def _cstring_array(
    values: Sequence[str | bytes], what: str, keep: list[Any], extra: Sequence[Any] = ()
) -> Any:
    pointers = [_cstring(v, what, keep) for v in values] + list(extra)
    array = ffi.new("char *[]", [*pointers, ffi.NULL])
    keep.append(array)
    return array


def _check_fd(fd: int, what: str) -> int:
    if not -1 <= fd <= _INT_MAX:
        raise ValueError(f"{what} must be an fd or -1, not {fd}")
    return fd


def _fd_array(fds: Sequence[int], keep: list[Any]) -> tuple[Any, int]:
    if len(fds) > _INT_MAX - 2:
        raise ValueError("too many fds")
    array = ffi.new("int[]", [_check_fd(fd, f"fds[{i}]") for i, fd in enumerate(fds)])
    keep.append(array)
    return array, len(fds)


def _rlimit_value(value: int, what: str) -> int:
    if value == resource.RLIM_INFINITY:
        return _RLIM_MAX
    if not 0 <= value <= _RLIM_MAX:
        raise ValueError(f"{what} out of range: {value}")
    return value


def _rlimit_array(rlimits: Sequence[Rlimit], keep: list[Any]) -> tuple[Any, int]:
    array = ffi.new("struct cv_rlimit[]", len(rlimits))
    for slot, limit in zip(array, rlimits, strict=True):
        if not 0 <= limit.resource <= _INT_MAX:
            raise ValueError(f"bad rlimit resource: {limit.resource}")
        slot.resource = limit.resource
        slot.soft = _rlimit_value(limit.soft, "rlimit soft limit")
        slot.hard = _rlimit_value(limit.hard, "rlimit hard limit")
    keep.append(array)
    return array, len(rlimits)


def _bpf(program: bytes | None, keep: list[Any]) -> tuple[Any, int]:
    if program is None:
        return ffi.NULL, 0
    count, rest = divmod(len(program), BPF_INSN_SIZE)
    if rest:
        raise ValueError(f"seccomp program of {len(program)} bytes is not whole instructions")
    if not 1 <= count <= BPF_MAXINSNS:
        raise ValueError(f"seccomp program has {count} instructions, not 1..{BPF_MAXINSNS}")
    buffer = ffi.from_buffer(program)
    keep.append(buffer)
    return buffer, count
