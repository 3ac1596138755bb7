"""``capvisor policy learn``: record what a program asks for, write a draft policy.

:func:`learn` spawns the program through :func:`supervisor.native.spawn`
under :func:`~supervisor.seccomp_notify.recording_program`: every syscall is
notified, recorded and let through with SECCOMP_USER_NOTIF_FLAG_CONTINUE.
The program is otherwise unconfined (no Landlock, its own environment and
fds 0-2): run only programs you would run anyway. Always-denied syscalls
fail with EPERM as they would under any policy, so the program takes the
fallback it will take in production.

:class:`Recording` is the pure part: calls in, :meth:`Recording.draft` out.
Drafts use a whole group where the program used most of it, conditions for
the syscalls that take them (socket families, ioctl commands, prctl
options, clone without namespaces, prlimit64 on itself), and comments with
argument hints (AT_FDCWD against real directory fds). Several runs merge:
:meth:`Recording.absorb` reads back a draft (or any policy).
"""

from __future__ import annotations

import os
import select
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import native
from . import seccomp_notify as notify
from .errors import CapvisorError
from .policy import ALLOW, MASK32, Policy, syscall_number
from .syscall_groups import ALWAYS_DENIED, CONSTANTS, GROUPS, TTY_INJECTION, expand

__all__ = ["WHOLE_GROUPS", "Recording", "learn"]

#: Groups a draft may name whole, when the program used at least
#: :data:`GROUP_SHARE` of their members. Others are always listed call by call.
WHOLE_GROUPS = ("@default", "@basic-io", "@file-system", "@io-event", "@signal", "@timer", "@sync")
GROUP_SHARE = 0.6

#: Syscalls whose draft rule carries a condition on this argument.
_CONDITIONED = {"socket": 0, "socketpair": 0, "ioctl": 1, "prctl": 0, "personality": 0}
#: Where the *at() syscalls take a directory fd.
_DIRFD_ARGS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        [
            "openat",
            "newfstatat",
            "statx",
            "faccessat",
            "faccessat2",
            "readlinkat",
            "mkdirat",
            "unlinkat",
            "fchmodat",
            "fchmodat2",
            "fchownat",
            "mknodat",
            "utimensat",
            "execveat",
            "openat2",
            "futimesat",
        ],
        (0,),
    ),
    "linkat": (0, 2),
    "renameat": (0, 2),
    "renameat2": (0, 2),
    "symlinkat": (1,),
}
_AT_FDCWD = CONSTANTS["AT_FDCWD"]
_CLONE_NEW = sum(v for k, v in CONSTANTS.items() if k.startswith("CLONE_NEW"))
_HARMLESS_PERSONALITY = (0, 0xFFFFFFFF)
_SOCK_TYPE = 0xF  # the type in socket()'s second argument; the rest are flags


def _name_of(value: int, prefix: str) -> str | int:
    for name, number in CONSTANTS.items():
        if name.startswith(prefix) and number & MASK32 == value:
            return name
    return value


@dataclass
class Recording:
    """What one or more runs asked for (pure; no I/O)."""

    calls: Counter[str] = field(default_factory=Counter)
    values: dict[str, set[int]] = field(default_factory=dict)
    dirfds: dict[str, set[str]] = field(default_factory=dict)
    types: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    clone_namespaces: bool = False
    prlimit_other: bool = False

    def add(self, name: str, args: Sequence[int]) -> None:
        """Record one call of ``name`` with its six arguments."""
        self.calls[name] += 1
        if name in _CONDITIONED:
            self.values.setdefault(name, set()).add(args[_CONDITIONED[name]] & MASK32)
        if name in ("socket", "socketpair"):
            self.types.setdefault(name, set()).add((args[0] & MASK32, args[1] & _SOCK_TYPE))
        for index in _DIRFD_ARGS.get(name, ()):
            kind = "AT_FDCWD" if args[index] & MASK32 == _AT_FDCWD else "a directory fd"
            self.dirfds.setdefault(name, set()).add(kind)
        if name in ("clone", "unshare") and args[0] & _CLONE_NEW:
            self.clone_namespaces = True
        if name == "prlimit64" and args[0] & MASK32 != 0:
            self.prlimit_other = True

    def absorb(self, policy: Policy) -> None:
        """Merge an earlier draft (or any policy): what it allows counts as seen."""
        for rule in policy.rules:
            if rule.action == ALLOW and not rule.checks:
                self.calls[rule.syscall] += 1
            elif rule.action == ALLOW:
                self.calls[rule.syscall] += 1
                checks = {c.arg: c for c in rule.checks}
                for check in rule.checks:
                    if check.mask == MASK32 and _CONDITIONED.get(rule.syscall) == check.arg:
                        self.values.setdefault(rule.syscall, set()).add(check.value)
                family, kind = checks.get(0), checks.get(1)
                if rule.syscall in ("socket", "socketpair") and family and kind:
                    pair = (family.value, kind.value)
                    self.types.setdefault(rule.syscall, set()).add(pair)
            elif rule.syscall == "clone3" and rule.origin.section == "errno":
                self.calls["clone3"] += 1

    def draft(self, command: Sequence[str] = ()) -> str:
        """The draft policy (YAML text)."""
        return _Draft(self).text(command)


class _Draft:
    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        seen = set(rec.calls) | {"execve", "exit_group"}
        self.denied = sorted(n for n in seen if ALWAYS_DENIED.get(n, 0) is None)
        self.seen = {n for n in seen if n not in self.denied and syscall_number(n) >= 0}
        self.special = {"clone", "clone3", "prlimit64", *_CONDITIONED}

    def groups(self) -> tuple[list[str], set[str]]:
        chosen, covered = [], set()
        for group in WHOLE_GROUPS:
            members = {m for m, _ in expand(group) if syscall_number(m) >= 0}
            members -= set(ALWAYS_DENIED)
            if members & self.special or len(members) < 3:
                continue
            if len(members & self.seen) >= GROUP_SHARE * len(members):
                chosen.append(group)
                covered |= members
        return chosen, covered

    def text(self, command: Sequence[str]) -> str:
        groups, covered = self.groups()
        single = sorted(self.seen - covered - self.special)
        lines = ["# Draft policy written by capvisor policy learn."]
        if command:
            lines.append(f"# Recorded: {' '.join(command)}")
        lines += [
            "# Review it: check it (capvisor policy check), run with audit: true, tighten.",
            "version: 1",
            "default: EPERM",
            "allow:",
        ]
        lines += [f'  - "{g}"  # {GROUPS[g].help}' for g in groups]
        lines += [f"  - {name}" for name in single]
        conditions = self.conditions()
        if conditions:
            lines.append("allow_if:")
            lines += conditions
        if "clone3" in self.seen:
            lines += [
                "errno:",
                "  # clone3's flags are in memory, out of seccomp's sight: libc falls back",
                "  # to clone on ENOSYS, which is allowed above with conditions.",
                "  clone3: ENOSYS",
            ]
        lines += self.hints()
        return "\n".join(lines) + "\n"

    def conditions(self) -> list[str]:
        out: list[str] = []
        rec = self.rec
        for name, arg in sorted(_CONDITIONED.items()):
            if name not in self.seen:
                continue
            if name in ("socket", "socketpair") and rec.types.get(name):
                out += self.socket(name, sorted(rec.types[name]))
                continue
            prefix = {"socket": "AF_", "socketpair": "AF_", "prctl": "PR_", "ioctl": "T"}.get(
                name, "PER_"
            )
            values = sorted(rec.values.get(name, set()))
            if name == "ioctl":
                values = [v for v in values if v not in TTY_INJECTION]
            if name == "personality":
                values = [v for v in values if v in _HARMLESS_PERSONALITY]
            if not values:
                continue
            shown = ", ".join(str(_display(v, name, prefix)) for v in values)
            out.append(f"  {name}: {{arg{arg}: {{any_of: [{shown}]}}}}")
        if {"clone", "clone3"} & self.seen:
            if rec.clone_namespaces:
                out.append("  # the program asked for new namespaces; they stay denied")
            out.append("  clone: {arg0: {none_of_mask: [0x7e020080]}}  # no CLONE_NEW*")
        if "prlimit64" in self.seen:
            if rec.prlimit_other:
                out.append("  # the program asked for another process's limits: denied")
            out.append("  prlimit64: {arg0: {eq: 0}}  # its own limits only")
        return out

    def socket(self, name: str, pairs: list[tuple[int, int]]) -> list[str]:
        """One alternative per (family, type) seen; SOCK_CLOEXEC/NONBLOCK stay free."""
        lines = [f"  {name}:"]
        for family, kind in pairs:
            fam, typ = _display(family, name, "AF_"), _display(kind, name, "SOCK_")
            lines.append(f"    - {{arg0: {{eq: {fam}}}, arg1: {{eq: {typ}, mask: 0xf}}}}")
        return lines

    def hints(self) -> list[str]:
        lines = []
        if self.denied:
            lines.append(f"# Always denied, whatever a policy says: {', '.join(self.denied)}")
        for name in sorted(self.rec.dirfds):
            kinds = " and ".join(sorted(self.rec.dirfds[name]))
            lines.append(f"# hint: {name} was called with {kinds}")
        return lines


def _display(value: int, name: str, prefix: str) -> str | int:
    shown = _name_of(value, prefix)
    if shown == value and name == "ioctl":
        shown = _name_of(value, "FIO")
    return hex(value) if isinstance(shown, int) and shown > 9 else shown


@dataclass(frozen=True)
class Learned:
    """The outcome of :func:`learn`: the recording and the program's wait status."""

    recording: Recording
    returncode: int


def learn(argv: Sequence[str], *, recording: Recording | None = None) -> Learned:
    """Run ``argv`` (``argv[0]`` searched in PATH) under the recording filter.

    Blocks until every process under the filter has exited (the listener
    hangs up), answering each call with CONTINUE. Returns the recording
    (``recording`` extended, if given) and the program's exit status as a
    shell shows it. Raises :class:`CapvisorError` if the program cannot be
    found, :class:`~supervisor.errors.SpawnError` if it cannot be started.
    """
    program = shutil.which(argv[0]) if argv else None
    if program is None:
        raise CapvisorError(f"learn: program not found: {argv[0] if argv else '(none)'}")
    rec = recording if recording is not None else Recording()
    request = native.SpawnRequest(
        path=program,
        argv=list(argv),
        env=[f"{k}={v}" for k, v in os.environ.items()],
        fds=[0, 1, 2],
        new_session=False,
        seccomp_bpf=notify.recording_program(chan=3),
        seccomp_listener=True,
    )
    child = native.spawn(request)
    try:
        _serve(child.listener, rec)
        status = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
    finally:
        os.close(child.listener)
        os.close(child.pidfd)
    code = status.si_status if status.si_code == os.CLD_EXITED else 128 + status.si_status
    return Learned(rec, code)


def _serve(listener: int, rec: Recording) -> None:
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        mask = events[0][1]
        if not mask & select.POLLIN:
            return  # POLLHUP: nobody is left under the filter
        note = notify.receive(listener)
        if note is None:
            continue
        try:
            name = notify.resolve_name(note.nr, note.arch)
        except ValueError:
            name = f"syscall_{note.nr}"
        if not name.startswith("syscall_"):
            rec.add(name, note.args)
        notify.respond(listener, note.id, cont=True)
