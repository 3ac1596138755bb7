"""Landlock rulesets, compiled in the supervisor.

The supervisor builds a ruleset fd here (landlock_create_ruleset and
landlock_add_rule through ``syscall(2)``); the child only calls
``landlock_restrict_self(fd, 0)`` between no_new_privs and seccomp. A ruleset
handles every right the running kernel's ABI knows, so whatever is not
granted by a :class:`PathGrant` is denied: TCP bind/connect are handled with
no rules (a program gets pre-opened sockets only), and from ABI 6 abstract
unix sockets and signals are scoped to the program's own domain.

Verbs: :func:`abi_version`, :func:`build_ruleset`; :meth:`Ruleset.report`,
:meth:`Ruleset.close`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from .errors import ConfinementError, ResolveError

# Syscall numbers (x86_64; also the generic table used by arm64/riscv64).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

# File system access rights (ABI 1 unless noted).
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

# Network access rights (ABI 4).
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1

# Scopes (ABI 6).
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

FS_NAMES: dict[int, str] = {
    FS_EXECUTE: "execute",
    FS_WRITE_FILE: "write_file",
    FS_READ_FILE: "read_file",
    FS_READ_DIR: "read_dir",
    FS_REMOVE_DIR: "remove_dir",
    FS_REMOVE_FILE: "remove_file",
    FS_MAKE_CHAR: "make_char",
    FS_MAKE_DIR: "make_dir",
    FS_MAKE_REG: "make_reg",
    FS_MAKE_SOCK: "make_sock",
    FS_MAKE_FIFO: "make_fifo",
    FS_MAKE_BLOCK: "make_block",
    FS_MAKE_SYM: "make_sym",
    FS_REFER: "refer",
    FS_TRUNCATE: "truncate",
    FS_IOCTL_DEV: "ioctl_dev",
}
NET_NAMES: dict[int, str] = {NET_BIND_TCP: "bind_tcp", NET_CONNECT_TCP: "connect_tcp"}
SCOPE_NAMES: dict[int, str] = {
    SCOPE_ABSTRACT_UNIX_SOCKET: "abstract_unix_socket",
    SCOPE_SIGNAL: "signal",
}

_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
#: The rights the kernel accepts on a rule for a non-directory.
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _ruleset_attr_size(abi: int) -> int:
    """The size of ``landlock_ruleset_attr`` as the given ABI defines it."""
    if abi >= 6:
        return 24  # + scoped
    if abi >= 4:
        return 16  # + handled_access_net
    return 8


@functools.cache
def abi_version() -> int:
    """The running kernel's Landlock ABI; 0 when unavailable or disabled (cached)."""
    ret = _syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(ret), 0)


def handled_fs(abi: int) -> int:
    """Every file system right ABI ``abi`` knows."""
    if abi < 1:
        return 0
    rights = _FS_ABI1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def handled_net(abi: int) -> int:
    """Every network right ABI ``abi`` knows (TCP bind and connect from ABI 4)."""
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scopes(abi: int) -> int:
    """Every scope ABI ``abi`` knows (abstract unix sockets and signals from ABI 6)."""
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def read_exec_rights(abi: int, is_dir: bool) -> int:
    """Read and execute: files get EXECUTE|READ_FILE, directories also READ_DIR."""
    rights = FS_EXECUTE | FS_READ_FILE
    if is_dir:
        rights |= FS_READ_DIR
    return rights & handled_fs(abi)


#: Never granted, not even in a read-write mount: creating device nodes. (The
#: capability drop already takes CAP_MKNOD; this is the second layer.)
FS_DEVICE_NODES = FS_MAKE_CHAR | FS_MAKE_BLOCK


def read_write_rights(abi: int, is_dir: bool) -> int:
    """Everything handled but device nodes; for a non-directory only the file rights."""
    rights = handled_fs(abi) & ~FS_DEVICE_NODES
    return rights if is_dir else rights & FS_FILE_RIGHTS


def right_names(mask: int, names: dict[int, str]) -> list[str]:
    """The names of the bits set in ``mask``, in bit order."""
    return [name for bit, name in names.items() if mask & bit]


@dataclass(frozen=True)
class PathGrant:
    """Access to one path (and, for a directory, everything beneath it).

    ``path`` is kept as the user wrote it, for the report. ``fd`` is an
    already-open fd of the path (such as a ``!mount`` directory fd), owned by
    the caller and never closed here; without it the path is opened
    ``O_PATH|O_CLOEXEC`` (following symlinks) while the rule is added.
    """

    path: str
    writable: bool
    fd: int | None = None
    reason: str = ""


@dataclass
class Ruleset:
    """A Landlock ruleset fd (CLOEXEC) and what went into it.

    The fd can be handed to any number of spawns; each child calls
    ``landlock_restrict_self`` on its inherited copy. The ruleset owns the fd:
    :meth:`close` it (or use ``with``) when no more spawns will use it.
    """

    fd: int
    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    grants: list[tuple[PathGrant, int]] = field(default_factory=list)

    def close(self) -> None:
        """Close the ruleset fd; idempotent, sets ``fd`` to -1."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Ruleset:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def report(self) -> dict[str, object]:
        """The effective confinement as JSON-able data: ABI, handled rights, scopes, rules."""
        return {
            "abi": self.abi,
            "handled_fs": right_names(self.handled_fs, FS_NAMES),
            "handled_net": right_names(self.handled_net, NET_NAMES),
            "scoped": right_names(self.scoped, SCOPE_NAMES),
            "rules": [
                {
                    "path": grant.path,
                    "rights": right_names(mask, FS_NAMES),
                    "reason": grant.reason,
                }
                for grant, mask in self.grants
            ],
        }


def _errno_error(what: str) -> ConfinementError:
    err = ctypes.get_errno()
    return ConfinementError(f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _create_ruleset(abi: int, fs: int, net: int, scoped: int) -> int:
    attr = _RulesetAttr(fs, net, scoped)
    fd = _syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(_ruleset_attr_size(abi)),
        ctypes.c_uint32(0),
    )
    if fd < 0:
        raise _errno_error(f"landlock_create_ruleset (ABI {abi})")
    return int(fd)


def _add_path_rule(ruleset_fd: int, parent_fd: int, access: int, path: str) -> None:
    attr = _PathBeneathAttr(access, parent_fd)
    ret = _syscall(
        ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
        ctypes.c_int(ruleset_fd),
        ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
        ctypes.byref(attr),
        ctypes.c_uint32(0),
    )
    if ret < 0:
        raise _errno_error(f"landlock_add_rule for {path}")


def _open_grant(grant: PathGrant) -> int:
    try:
        return os.open(grant.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        kind = grant.reason.split(maxsplit=1)[0] if grant.reason.strip() else ""
        what = f"{kind} path" if kind else "path"
        raise ResolveError(None, f"{what} {grant.path}: {e.strerror}") from e


def build_ruleset(grants: Sequence[PathGrant], *, abi: int | None = None) -> Ruleset:
    """Compile ``grants`` into a Landlock ruleset fd.

    Handles every right of ``abi`` (default: the running kernel's ABI; a
    lower ABI may be asked for, a higher one may not). Read-only grants get
    :func:`read_exec_rights`, writable ones :func:`read_write_rights`; a
    non-directory gets file rights only.

    Raises :class:`ConfinementError` when Landlock is unavailable (or ``abi``
    is beyond the kernel's) or the kernel refuses a rule, and
    :class:`ResolveError` (without a location; the caller adds one) when a
    grant's path cannot be opened. On any failure every fd opened here is
    closed again; fds passed in grants are never closed.
    """
    kernel_abi = abi_version()
    if abi is None:
        abi = kernel_abi
    if abi < 1 or kernel_abi < 1:
        raise ConfinementError(
            "Landlock is not available (kernel without CONFIG_SECURITY_LANDLOCK, "
            "or landlock missing from the lsm= boot parameter)"
        )
    if abi > kernel_abi:
        raise ConfinementError(f"Landlock ABI {abi} asked for, the kernel has ABI {kernel_abi}")
    fs, net, scoped = handled_fs(abi), handled_net(abi), scopes(abi)
    ruleset = Ruleset(_create_ruleset(abi, fs, net, scoped), abi, fs, net, scoped)
    try:
        for grant in grants:
            own_fd = grant.fd is None
            fd = _open_grant(grant) if grant.fd is None else grant.fd
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                rights = (read_write_rights if grant.writable else read_exec_rights)(abi, is_dir)
                _add_path_rule(ruleset.fd, fd, rights, grant.path)
            finally:
                if own_fd:
                    os.close(fd)
            ruleset.grants.append((grant, rights))
    except BaseException:
        ruleset.close()
        raise
    return ruleset
