"""Audit mode: denied syscalls named in-band, in the program's own log.

With ``audit: true`` in a description (or ``capvisor run --audit``) the
program runs under :func:`~supervisor.seccomp_notify.audit_program`: its
policy, with every errno denial turned into a user notification. For each
one the supervisor writes a line to the program's log::

    capvisor: denied openat(AT_FDCWD, "/etc/shadow", O_RDONLY) by policy p: EPERM (deny …)

and answers the call with the errno the policy gives it (never CONTINUE), so
the program sees what it would see without audit. Calls the policy kills
are not reported (a killed call cannot be answered; the exit status says
SIGSYS). :func:`describe` is the pure part; :func:`serve` the trio loop.
"""

from __future__ import annotations

import errno as errno_module
import select
from collections.abc import Callable, Sequence

import trio

from . import seccomp_notify as notify
from .errors import errno_name
from .logs import timestamp
from .policy import ALLOW, CompiledPolicy, Policy, Rule
from .syscall_groups import CONSTANTS

__all__ = ["SIGNATURES", "Denial", "describe", "format_call", "log_record", "serve"]

#: How the arguments of common syscalls are shown; others show six hex values.
#: Kinds: fd, dirfd, path, oflags, mode, int, hex, family, socktype, ioctl, prctl, clone.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "open": ("path", "oflags", "mode"),
    "openat": ("dirfd", "path", "oflags", "mode"),
    "openat2": ("dirfd", "path", "hex", "int"),
    "creat": ("path", "mode"),
    "access": ("path", "int"),
    "faccessat": ("dirfd", "path", "int"),
    "faccessat2": ("dirfd", "path", "int", "int"),
    "stat": ("path", "hex"),
    "lstat": ("path", "hex"),
    "newfstatat": ("dirfd", "path", "hex", "hex"),
    "statx": ("dirfd", "path", "hex", "hex", "hex"),
    "readlink": ("path", "hex", "int"),
    "readlinkat": ("dirfd", "path", "hex", "int"),
    "mkdir": ("path", "mode"),
    "mkdirat": ("dirfd", "path", "mode"),
    "unlink": ("path",),
    "unlinkat": ("dirfd", "path", "hex"),
    "rmdir": ("path",),
    "rename": ("path", "path"),
    "renameat2": ("dirfd", "path", "dirfd", "path", "hex"),
    "chdir": ("path",),
    "chmod": ("path", "mode"),
    "fchmodat": ("dirfd", "path", "mode"),
    "execve": ("path", "hex", "hex"),
    "execveat": ("dirfd", "path", "hex", "hex", "hex"),
    "read": ("fd", "hex", "int"),
    "write": ("fd", "hex", "int"),
    "close": ("fd",),
    "fstat": ("fd", "hex"),
    "ioctl": ("fd", "ioctl", "hex"),
    "fcntl": ("fd", "int", "hex"),
    "socket": ("family", "socktype", "int"),
    "socketpair": ("family", "socktype", "int", "hex"),
    "connect": ("fd", "hex", "int"),
    "bind": ("fd", "hex", "int"),
    "listen": ("fd", "int"),
    "accept4": ("fd", "hex", "hex", "hex"),
    "sendto": ("fd", "hex", "int", "hex", "hex", "int"),
    "sendmsg": ("fd", "hex", "hex"),
    "recvfrom": ("fd", "hex", "int", "hex", "hex", "hex"),
    "clone": ("clone", "hex", "hex", "hex", "hex"),
    "clone3": ("hex", "int"),
    "prctl": ("prctl", "hex", "hex", "hex", "hex"),
    "kill": ("int", "int"),
    "ptrace": ("int", "int", "hex", "hex"),
    "mount": ("path", "path", "path", "hex", "hex"),
    "unshare": ("clone",),
    "personality": ("hex",),
    "prlimit64": ("int", "int", "hex", "hex"),
    "getrandom": ("hex", "int", "hex"),
    "mprotect": ("hex", "int", "hex"),
    "mmap": ("hex", "int", "hex", "hex", "fd", "hex"),
    "chroot": ("path",),
    "bpf": ("int", "hex", "int"),
    **{
        name: ()
        for name in (
            "getpid",
            "getppid",
            "gettid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "fork",
            "vfork",
            "sync",
            "pause",
            "sched_yield",
        )
    },
}

_AT_FDCWD = 0xFFFFFF9C
_O_ACCMODE = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_O_FLAGS = (
    (0o100, "O_CREAT"),
    (0o200, "O_EXCL"),
    (0o400, "O_NOCTTY"),
    (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"),
    (0o4000, "O_NONBLOCK"),
    (0o200000, "O_DIRECTORY"),
    (0o400000, "O_NOFOLLOW"),
    (0o2000000, "O_CLOEXEC"),
    (0o10000000, "O_PATH"),
)


def _named(prefix: str, value: int) -> str:
    for name, number in CONSTANTS.items():
        if name.startswith(prefix) and number & 0xFFFFFFFF == value:
            return name
    return str(value) if value < 0x10000 else hex(value)


def _oflags(value: int) -> str:
    parts = [_O_ACCMODE.get(value & 3, hex(value & 3))]
    rest = value & ~3
    for bit, name in _O_FLAGS:
        if rest & bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)


def _clone(value: int) -> str:
    names = [n for n, bit in CONSTANTS.items() if n.startswith("CLONE_") and value & bit]
    rest = value & ~sum(CONSTANTS[n] for n in names)
    return "|".join(names + ([hex(rest)] if rest or not names else []))


def _signed(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _argument(kind: str, value: int, read: Callable[[int], bytes | None]) -> str:
    low = value & 0xFFFFFFFF
    if kind == "path":
        text = read(value)
        return hex(value) if text is None else _quote(text)
    if kind == "dirfd":
        return "AT_FDCWD" if low == _AT_FDCWD else str(_signed(low))
    if kind in ("fd", "int"):
        return str(_signed(low))
    if kind == "oflags":
        return _oflags(low)
    if kind == "mode":
        return oct(low)
    if kind == "family":
        return _named("AF_", low)
    if kind == "ioctl":
        return _named("T", low) if _named("T", low) != str(low) else _named("FIO", low)
    if kind == "socktype":
        flags = [n for n in ("SOCK_NONBLOCK", "SOCK_CLOEXEC") if low & CONSTANTS[n]]
        base = low & ~(CONSTANTS["SOCK_NONBLOCK"] | CONSTANTS["SOCK_CLOEXEC"])
        return "|".join([_named("SOCK_", base), *flags])
    if kind == "prctl":
        return _named("PR_", low)
    if kind == "clone":
        return _clone(low)
    return hex(value)


def _quote(text: bytes) -> str:
    body = text.decode("utf-8", "backslashreplace").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in body) + '"'


def format_call(name: str, args: Sequence[int], read: Callable[[int], bytes | None]) -> str:
    """``openat(AT_FDCWD, "/etc/shadow", O_RDONLY)``: a call as a reader wants it.

    ``read(address)`` returns the C string at an address of the caller's
    memory, or None (the address is then shown in hex).
    """
    kinds = SIGNATURES.get(name, ("hex",) * 6)
    shown = [_argument(kind, args[i], read) for i, kind in enumerate(kinds)]
    if name in ("open", "openat") and not args[len(kinds) - 2] & 0o100:
        shown.pop()  # the mode only counts with O_CREAT
    return f"{name}({', '.join(shown)})"


def _holds(rule: Rule, args: Sequence[int]) -> bool:
    return all(args[c.arg] & c.mask == c.value for c in rule.checks)


def _rule_for(policy: Policy, name: str, args: Sequence[int]) -> Rule | None:
    for rule in policy.rules:
        if rule.syscall == name and rule.action != ALLOW and _holds(rule, args):
            return rule
    return None


class Denial:
    """One denied call: what the log line says and the errno to answer with."""

    def __init__(self, text: str, error: int) -> None:
        self.text = text
        self.error = error

    def __str__(self) -> str:
        return self.text


def describe(
    compiled: CompiledPolicy,
    nr: int,
    arch: int,
    args: Sequence[int],
    read: Callable[[int], bytes | None],
) -> Denial:
    """The report and answer for a notified call; pure but for ``read``.

    The errno is what ``compiled.bpf`` returns for the call (so audit and
    enforcement cannot disagree); the reason is the policy rule that denies
    it, or the default action.
    """
    action = notify.evaluate(compiled.bpf, nr, arch, tuple(args))
    error = action & notify.RET_DATA if action & notify.RET_ACTION_FULL == notify.RET_ERRNO else 0
    error = error or errno_module.EPERM
    try:
        name = notify.resolve_name(nr, arch)
    except ValueError:
        name = f"syscall_{nr}"
    rule = _rule_for(compiled.policy, name, args)
    guard = compiled.policy.guards().get(name)
    if guard is not None and guard.denies(args[guard.arg]):
        reason = f"always denied for this arg{guard.arg}"
    elif rule is not None:
        reason = str(rule.origin)
    elif name in {r.syscall for r in compiled.policy.rules}:
        reason = f"{name}'s arguments match no rule, default action"
    else:
        reason = "default action"
    text = (
        f"denied {format_call(name, args, read)} by policy {compiled.name}: "
        f"{errno_name(error)} ({reason})"
    )
    return Denial(text, error)


def log_record(text: str) -> bytes:
    """A CRI record on the stderr stream for a supervisor line."""
    return timestamp() + b" stderr F capvisor: " + text.encode(errors="replace") + b"\n"


def handle(listener: int, compiled: CompiledPolicy, emit: Callable[[str], None]) -> None:
    """Receive one notification, report it with ``emit`` and answer it."""
    note = notify.receive(listener)
    if note is None:
        return

    def read(address: int) -> bytes | None:
        return notify.read_string(note.pid, address)

    try:
        denial = describe(compiled, note.nr, note.arch, note.args, read)
    except Exception as exc:  # a bug here must not leave the call unanswered
        text = f"denied syscall {note.nr} by policy {compiled.name} (not described: {exc!r})"
        denial = Denial(text, errno_module.EPERM)
    # The strings were read from memory the caller may reuse once its call
    # is gone: report only if it still waits (then they were its arguments).
    if notify.id_valid(listener, note.id):
        emit(denial.text)
    notify.respond(listener, note.id, error=denial.error)


def _hung_up(listener: int) -> bool:
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    return any(mask & select.POLLHUP and not mask & select.POLLIN for _, mask in poller.poll(0))


async def serve(listener: int, compiled: CompiledPolicy, emit: Callable[[str], None]) -> None:
    """Answer every denial of the audited processes until none is left.

    Returns when every process under the filter has exited (the listener
    hangs up); cancel it to stop earlier. Does not close ``listener``.
    """
    while True:
        await trio.lowlevel.wait_readable(listener)
        if _hung_up(listener):
            return
        try:
            handle(listener, compiled, emit)
        except OSError as exc:  # the listener itself failed: nothing left to answer with
            emit(f"audit stopped: {exc.strerror or exc}")
            return
