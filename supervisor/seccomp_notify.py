"""Seccomp user notification (SECCOMP_RET_USER_NOTIF): filters and the listener.

Two users, both through :func:`supervisor.native.spawn` with
``seccomp_listener=True``:

- ``capvisor policy learn`` installs :func:`recording_program`: every call
  is notified and answered with SECCOMP_USER_NOTIF_FLAG_CONTINUE, so the
  program runs as it would unconfined while we record what it asks for. It
  is never used for enforcement (CONTINUE is not a security decision).
- audit mode installs :func:`audit_program`: the policy's own filter with
  every errno return turned into a notification; the supervisor reports the
  call and answers with the errno the policy gives it (never CONTINUE), so
  the program sees exactly what it would without audit.

Both programs start with :func:`_prefix`, which lets the spawning child's
own last calls through (sendmsg of the listener on the channel, a failure
report, exit_group; execve for the recording filter): the parent thread is
asleep in clone(CLONE_VFORK) until the child execs, so a notified call there
would never be answered. ``native/spawn.c`` (send_listener) explains the
hand-over.

The ioctls are issued from Python on the listener fd: :func:`receive`,
:func:`respond`, :func:`id_valid`; :func:`read_string` reads a C string from
the caller's memory (checked with :func:`id_valid` afterwards: the memory
could be reused once the call is gone).
"""

from __future__ import annotations

import errno as errno_module
import fcntl
import os
import struct
from dataclasses import dataclass

import pyseccomp

from .native import LISTENER_MSG_FLAGS
from .policy import NATIVE_ARCH, CompiledPolicy, _arg_offset, _assemble, _Insn, syscall_number
from .syscall_groups import ALWAYS_DENIED

__all__ = [
    "RET_USER_NOTIF",
    "Notification",
    "audit_program",
    "evaluate",
    "id_valid",
    "read_string",
    "receive",
    "recording_program",
    "resolve_name",
    "respond",
]

RET_ALLOW = 0x7FFF0000
RET_USER_NOTIF = 0x7FC00000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF
FLAG_CONTINUE = 1

_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif (80 bytes)
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp (24 bytes)


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_NOTIF_RECV = _iowr(0, _NOTIF.size)
IOCTL_NOTIF_SEND = _iowr(1, _RESP.size)
IOCTL_NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2  # _IOW('!', 2, __u64)

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
_OFFSET_NR = 0
_OFFSET_ARCH = 4


# ---------------------------------------------------------------------------
# Filters.


def _prefix(chan: int, *, allow_execve: bool) -> list[_Insn | str]:
    """Allow the spawning child's own calls after the install (see spawn.c).

    ``chan`` is the channel's fd number in the child (the number of fds it
    gets). Everything else jumps to the label ``rest``.
    """
    allowed = ["exit_group"] + (["execve"] if allow_execve else [])
    prog: list[_Insn | str] = [
        _Insn(_LD_W_ABS, _OFFSET_ARCH),
        _Insn(_JEQ_K, NATIVE_ARCH, None, "rest"),
        _Insn(_LD_W_ABS, _OFFSET_NR),
        _Insn(_JEQ_K, syscall_number("sendmsg"), "send"),
        _Insn(_JEQ_K, syscall_number("write"), "write"),
    ]
    prog += [_Insn(_JEQ_K, syscall_number(name), "allow") for name in allowed]
    prog += [_Insn(_JEQ_K, 0, "rest", "rest")]  # an unconditional jump
    prog += ["send", _Insn(_LD_W_ABS, _arg_offset(2))]
    prog += [_Insn(_JEQ_K, LISTENER_MSG_FLAGS, "write", "rest")]
    prog += ["write", _Insn(_LD_W_ABS, _arg_offset(0))]
    prog += [_Insn(_JEQ_K, chan, "allow", "rest")]
    prog += ["allow", _Insn(_RET_K, RET_ALLOW), "rest"]
    return prog


def recording_program(chan: int) -> bytes:
    """The filter of ``policy learn``: notify every call but the spawn's own.

    Always-denied syscalls (denied outright) fail with EPERM without a
    notification, as they would under any policy, so the program takes the
    fallback it would take in production. A foreign architecture is killed.
    """
    outright = sorted(name for name, guard in ALWAYS_DENIED.items() if guard is None)
    prog = _prefix(chan, allow_execve=True)
    prog += [
        _Insn(_LD_W_ABS, _OFFSET_ARCH),
        _Insn(_JEQ_K, NATIVE_ARCH, None, "kill"),
        _Insn(_LD_W_ABS, _OFFSET_NR),
    ]
    prog += [_Insn(_JEQ_K, syscall_number(name), "deny") for name in outright]
    prog += [_Insn(_RET_K, RET_USER_NOTIF)]
    prog += ["deny", _Insn(_RET_K, RET_ERRNO | errno_module.EPERM)]
    prog += ["kill", _Insn(_RET_K, RET_KILL_PROCESS)]
    return _assemble(prog)


def audit_program(compiled: CompiledPolicy, chan: int) -> bytes:
    """``compiled``'s filter, with every errno return replaced by a notification.

    Kill and log returns stay as they are (a killed call cannot be answered).
    The supervisor finds the errno to answer with by running ``compiled.bpf``
    on the notified call (:func:`evaluate`).
    """
    out = bytearray(_assemble(_prefix(chan, allow_execve=False)))
    for offset in range(0, len(compiled.bpf), 8):
        code, jt, jf, k = struct.unpack_from("=HBBI", compiled.bpf, offset)
        if code == _RET_K and k & RET_ACTION_FULL == RET_ERRNO:
            k = RET_USER_NOTIF
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)


def evaluate(bpf: bytes, nr: int, arch: int, args: tuple[int, ...], ip: int = 0) -> int:
    """Run a classic BPF seccomp program on one call; the SECCOMP_RET_* value.

    Knows the instructions libseccomp and this module emit (absolute word
    loads, AND with a constant, conditional and unconditional jumps on
    constants, returns of a constant); raises ValueError on anything else.
    """
    data = struct.pack("=iIQ6Q", nr, arch, ip, *args)
    pc = acc = 0
    count = len(bpf) // 8
    while 0 <= pc < count:
        code, jt, jf, k = struct.unpack_from("=HBBI", bpf, pc * 8)
        pc += 1
        if code == _LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # alu and #k
            acc &= k
        elif code == _RET_K:
            return k
        elif code == 0x05:  # ja
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset with k
            test = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
            pc += jt if test else jf
        else:
            raise ValueError(f"unexpected BPF instruction {code:#x} at {pc - 1}")
    raise ValueError("BPF program ran off its end")


def resolve_name(nr: int, arch: int = NATIVE_ARCH) -> str:
    """The name of syscall ``nr`` on ``arch``; ValueError if libseccomp knows none."""
    return pyseccomp.resolve_syscall(arch, nr).decode()


# ---------------------------------------------------------------------------
# The listener.


@dataclass(frozen=True)
class Notification:
    """One notified call: ``id`` for the answer, the calling thread ``pid``,
    the syscall ``nr``, ``arch``, instruction pointer and six ``args``."""

    id: int
    pid: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]


def receive(listener: int) -> Notification | None:
    """SECCOMP_IOCTL_NOTIF_RECV; blocks if nothing is pending.

    Returns None when the notified call went away first (ENOENT: the caller
    was killed or interrupted). Raises OSError otherwise.
    """
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buf, True)
    except OSError as exc:
        if exc.errno in (errno_module.ENOENT, errno_module.EINTR):
            return None
        raise
    nid, pid, _flags, nr, arch, ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, arch, ip, tuple(args))


def respond(listener: int, nid: int, *, error: int = 0, cont: bool = False) -> bool:
    """Answer notification ``nid``: fail it with ``error`` (a positive errno),
    or let it run (``cont``). False when the call went away meanwhile."""
    flags = FLAG_CONTINUE if cont else 0
    buf = bytearray(_RESP.pack(nid, 0, -error if error else 0, flags))
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SEND, buf, True)
    except OSError as exc:
        if exc.errno == errno_module.ENOENT:
            return False
        raise
    return True


def id_valid(listener: int, nid: int) -> bool:
    """Whether notification ``nid`` is still pending (its caller still waits)."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
    except OSError:
        return False
    return True


def read_string(pid: int, address: int, limit: int = 256) -> bytes | None:
    """The NUL-terminated string at ``address`` in ``pid``'s memory, at most
    ``limit`` bytes (longer ones are cut); None if it cannot be read."""
    if address == 0:
        return None
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = b""
        while len(data) < limit:
            # Stay within one page per read: the next page may be unmapped.
            here = address + len(data)
            chunk = min(limit - len(data), 4096 - here % 4096)
            try:
                part = os.pread(fd, chunk, here)
            except OSError:
                break
            if not part:
                break
            data += part
            if b"\0" in part:
                break
    finally:
        os.close(fd)
    if not data:
        return None
    return data.split(b"\0", 1)[0]
