"""Resolution: a :class:`Description` becomes a :class:`LaunchPlan`.

Every capability request is turned into an open fd, the program's seccomp
policy is compiled, its Landlock ruleset built and its rlimits set. The plan
owns every fd it opened: if resolution fails part-way, everything opened so
far is closed and nothing is spawned. Resolving never spawns.

Placement (DESIGN §3): stdin/stdout/stderr at 0-2, named fds from 3 in the
order written, then the fds of tags that stand only inside ``args`` or
``env`` values. A tag inside ``args``/``env`` becomes its fd number.
A YAML alias of a tagged node is the same capability, hence the same fd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import landlock, policy, seccomp_notify, tags
from .description import Arg, Description
from .errors import (
    ConfinementError,
    Location,
    ProgramNotExecutable,
    ProgramNotFound,
    ResolveError,
)
from .native import Rlimit, SpawnRequest
from .runtime import check_executable, runtime_set
from .switchboard_protocol import (
    ProtocolError,
    SwitchboardError,
    conflicts,
    format_labels,
    merge,
)

_RLIMITS = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "memlock": resource.RLIMIT_MEMLOCK,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "stack": resource.RLIMIT_STACK,
}
_FILE_FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_APPEND,
    "rw": os.O_RDWR,
}
_SOCKET_TYPES = {
    "stream": socket.SOCK_STREAM,
    "dgram": socket.SOCK_DGRAM,
    "seqpacket": socket.SOCK_SEQPACKET,
}


class SwitchboardAccess(Protocol):
    """What resolving ``!server``, ``!client`` and ``!connect`` needs from a switchboard.

    Each method returns a new fd the caller owns, or raises
    :class:`~supervisor.switchboard_protocol.SwitchboardError` (the broker
    refused) or :class:`OSError`. Methods are called synchronously while
    resolving: an embedding supervisor whose broker runs on its own trio loop
    resolves in a worker thread with a
    :class:`~supervisor.switchboard_client.Handle` to it (docs/switchboard.md).
    """

    def server_handle(self, labels: Mapping[str, str]) -> int:
        """A handle that may only ``server_start``, with ``labels`` as fixed in-labels."""
        ...

    def client_handle(self, labels: Mapping[str, str]) -> int:
        """A handle that may only ``client_connect``, with ``labels`` as fixed out-labels."""
        ...

    def connect_fd(self, labels: Mapping[str, str]) -> int:
        """A stream socket connected to the server matching ``labels``."""
        ...


@dataclass(frozen=True)
class HostMount:
    """A mount of the enclosing context that ``!mount NAME`` may name."""

    host_path: str
    read_only: bool = True


@dataclass(frozen=True)
class PlacedFd:
    """One fd of the child: where it goes, what it is, where it was asked for."""

    target: int
    name: str
    capability: tags.Capability
    summary: str


@dataclass(frozen=True)
class LogPipe:
    """The supervisor's read end of a ``!log`` pipe."""

    stream: tags.StreamName
    read_fd: int


@dataclass
class LaunchPlan:
    """Everything needed to spawn one program, all fds open, nothing spawned.

    The plan owns its fds: call :meth:`close_child_side` once the child has
    been spawned (the child has its own copies) and :meth:`close` when done.
    The read ends of log pipes are handed over with :meth:`take_log_pipes`.
    """

    description: Description
    program: str
    argv: list[str]
    env: list[str]
    placed: list[PlacedFd]
    sources: list[int]
    log_pipes: list[LogPipe]
    rlimits: list[Rlimit]
    compiled_policy: policy.CompiledPolicy | None
    ruleset: landlock.Ruleset | None
    runtime: list[dict[str, Any]]
    degraded: list[str] = field(default_factory=list)
    #: Denied syscalls are notified and reported (``run --audit``; run_plan sets it for a
    #: description's ``audit: true``). Whoever spawns an audited plan must answer the
    #: listener (:func:`supervisor.audit.serve`), or the first denied call blocks.
    audit: bool = False
    _owned: list[int] = field(default_factory=list, repr=False)

    def spawn_request(self) -> SpawnRequest:
        """The request for :func:`supervisor.native.spawn`."""
        return SpawnRequest(
            path=self.program,
            argv=self.argv,
            env=self.env,
            fds=self.sources,
            cwd=self.description.cwd,
            new_session=True,
            rlimits=self.rlimits,
            landlock_ruleset_fd=self.ruleset.fd if self.ruleset else -1,
            seccomp_bpf=self._seccomp_bpf(),
            listen_pid=len(self.placed) > 3,
            seccomp_listener=self.audit and self.compiled_policy is not None,
        )

    def _seccomp_bpf(self) -> bytes | None:
        """The policy's filter; in audit mode with its denials notified (audit.py)."""
        if self.compiled_policy is None:
            return None
        if self.audit:
            return seccomp_notify.audit_program(self.compiled_policy, chan=len(self.sources))
        return self.compiled_policy.bpf

    def take_log_pipes(self) -> list[LogPipe]:
        """Hand the log pipes' read ends to the caller, who must close them."""
        pipes, self.log_pipes = self.log_pipes, []
        return pipes

    def close_child_side(self) -> None:
        """Close the supervisor's copies of the fds placed in the child."""
        for fd in self._owned:
            _close(fd)
        self._owned.clear()
        if self.ruleset is not None:
            self.ruleset.close()

    def close(self) -> None:
        """Close everything the plan still owns (idempotent)."""
        self.close_child_side()
        for pipe in self.take_log_pipes():
            _close(pipe.read_fd)

    def report(self) -> dict[str, Any]:
        """The effective confinement as JSON-able data (``capvisor run --report``)."""
        d = self.description
        return {
            "program": self.program,
            "argv": self.argv,
            "fds": [
                {
                    "fd": p.target,
                    "name": p.name,
                    "capability": p.summary,
                    "at": str(p.capability.location) if p.capability.location else None,
                }
                for p in self.placed
            ],
            "landlock": self.ruleset.report() if self.ruleset else {"abi": 0, "applied": False},
            "seccomp": (
                {
                    "policy": self.compiled_policy.name,
                    "source": str(self.compiled_policy.source),
                    "digest": self.compiled_policy.digest,
                    "instructions": self.compiled_policy.instructions,
                    "audit": self.audit or self.description.audit,
                }
                if self.compiled_policy
                else {"applied": False}
            ),
            "limits": {name: ("unlimited" if v < 0 else v) for name, v in d.limits.items()},
            "no_new_privs": True,
            "new_session": True,
            "namespaces": [],
            "runtime": self.runtime,
            "degraded": self.degraded,
            "cwd": d.cwd,
        }


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Resolver:
    """Opens fds for capabilities, remembering each so a failure closes all."""

    def __init__(
        self,
        description: Description,
        mounts: Mapping[str, HostMount],
        switchboard: SwitchboardAccess | None = None,
        identity: Mapping[str, str] | None = None,
    ) -> None:
        self.description = description
        self.mounts = mounts
        self.switchboard = switchboard
        self.identity = identity if identity is not None else {"program": description.name}
        self.owned: list[int] = []
        self.log_pipes: list[LogPipe] = []
        self.grants: list[landlock.PathGrant] = []
        self.by_identity: dict[int, int] = {}  # id(capability) -> source fd
        self.summaries: dict[int, str] = {}

    def fd_for(self, capability: tags.Capability) -> int:
        """The supervisor-side fd for ``capability`` (opened once per capability)."""
        key = id(capability)
        if key not in self.by_identity:
            try:
                fd, summary = self.open(capability)
            except OSError as exc:
                raise ResolveError(
                    capability.location, f"{capability.tag}: {_os_reason(exc)}"
                ) from exc
            self.by_identity[key] = fd
            self.summaries[key] = summary
        return self.by_identity[key]

    def keep(self, fd: int) -> int:
        self.owned.append(fd)
        return fd

    def open(self, cap: tags.Capability) -> tuple[int, str]:
        match cap:
            case tags.Log(stream=stream):
                read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
                self.log_pipes.append(LogPipe(stream, read_fd))
                return self.keep(write_fd), f"!log {stream}"
            case tags.File():
                return self.open_file(cap), f"!file {cap.path} ({cap.mode})"
            case tags.Mount():
                return self.open_mount(cap)
            case tags.Socket():
                return self.open_socket(cap), _socket_summary(cap)
            case tags.Fd(number=number):
                try:
                    fd = os.dup(number)
                except OSError as exc:
                    raise ResolveError(cap.location, f"!fd {number}: not open in capvisor") from exc
                return self.keep(fd), f"!fd {number}"
            case tags.Executable():
                fd = os.open(self.description.program, os.O_RDONLY | os.O_CLOEXEC)
                return self.keep(fd), f"!executable {self.description.program}"
            case tags.Server() | tags.Client() | tags.Connect():
                return self.open_switchboard(cap)
        raise AssertionError(f"unhandled capability {cap!r}")  # a bug, not user input

    def open_switchboard(self, cap: tags.Server | tags.Client | tags.Connect) -> tuple[int, str]:
        """A switchboard handle (``!server``, ``!client``) or connection (``!connect``)."""
        board = self.switchboard
        if board is None:
            raise ResolveError(
                cap.location,
                f"{cap.tag} needs a switchboard; this supervisor was started without one",
            )
        try:
            if isinstance(cap, tags.Server):
                try:
                    labels = merge(self.identity, cap.labels)
                except SwitchboardError as exc:
                    clash = conflicts(self.identity, cap.labels)
                    if not clash:
                        raise ResolveError(cap.location, f"!server: {exc.message}") from None
                    raise ResolveError(
                        cap.location,
                        f"!server: {', '.join(clash)}: identity labels "
                        f"{format_labels({k: self.identity[k] for k in clash})} "
                        "cannot be overridden",
                    ) from None
                return self.keep(board.server_handle(labels)), f"!server {format_labels(labels)}"
            if isinstance(cap, tags.Client):
                fd = board.client_handle(cap.labels)
                return self.keep(fd), f"!client {format_labels(cap.labels)}"
            fd = board.connect_fd(cap.labels)
            return self.keep(fd), f"!connect {format_labels(cap.labels)}"
        except SwitchboardError as exc:
            raise ResolveError(cap.location, f"{cap.tag}: {exc.message}") from exc
        except (ProtocolError, EOFError) as exc:
            raise ResolveError(cap.location, f"{cap.tag}: switchboard: {exc}") from exc

    def path(self, path: str) -> str:
        """``path``, relative ones taken from the description's directory."""
        return os.path.normpath(os.path.join(self.description.directory, path))

    def open_file(self, cap: tags.File) -> int:
        flags = _FILE_FLAGS[cap.mode] | os.O_CLOEXEC | os.O_NOCTTY
        if cap.create:
            flags |= os.O_CREAT
        fd = self.keep(os.open(self.path(cap.path), flags, 0o644))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise ResolveError(cap.location, f"!file {cap.path}: is a directory (use !mount)")
        return fd

    def open_mount(self, cap: tags.Mount) -> tuple[int, str]:
        if cap.name is not None:
            mount = self.mounts.get(cap.name)
            if mount is None:
                raise ResolveError(cap.location, f"!mount {cap.name}: no such mount")
            path, writable = mount.host_path, not mount.read_only
        else:
            path, writable = self.path(cap.path or ""), cap.mode == "rw"
        fd = self.keep(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        self.grants.append(
            landlock.PathGrant(path, writable=writable, fd=fd, reason=f"mount {cap.name or path}")
        )
        return fd, f"!mount {path} ({'rw' if writable else 'ro'})"

    def open_socket(self, cap: tags.Socket) -> int:
        address = cap.bind or cap.connect
        assert address is not None  # checked when parsed
        family, sockaddr = _sockaddr(address)
        kind = _SOCKET_TYPES[cap.type]
        with socket.socket(family, kind | socket.SOCK_CLOEXEC) as sock:
            try:
                if cap.bind is not None:
                    if family != socket.AF_UNIX:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(sockaddr)
                    if kind != socket.SOCK_DGRAM:
                        sock.listen(cap.backlog)
                else:
                    sock.settimeout(10.0)
                    sock.connect(sockaddr)
                    sock.setblocking(True)
            except TimeoutError as exc:
                raise OSError(errno.ETIMEDOUT, f"connect to {address} timed out") from exc
            except OSError as exc:
                raise OSError(exc.errno, f"{address}: {exc.strerror}") from exc
            return self.keep(sock.detach())


def _socket_summary(cap: tags.Socket) -> str:
    verb = "bind" if cap.bind else "connect"
    return f"!socket {verb} {cap.bind or cap.connect} ({cap.type})"


def _sockaddr(address: tags.Address) -> tuple[int, Any]:
    if address.scheme == "unix":
        return socket.AF_UNIX, ("\0" + address.path) if address.abstract else address.path
    host = "127.0.0.1" if address.host == "localhost" else address.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, address.port)


def _os_reason(exc: OSError) -> str:
    name = exc.filename or ""
    reason = exc.strerror or str(exc)
    return f"{name}: {reason}" if name else reason


def check_program(description: Description) -> str:
    """The program's path, checked to exist and be an executable regular file."""
    path = description.program
    try:
        check_executable(path, f"program {path}")
    except (ProgramNotFound, ProgramNotExecutable) as exc:
        raise type(exc)(_at(description.at("program"), str(exc))) from None
    return path


def _at(location: Location | None, message: str) -> str:
    return f"{location}: {message}" if location else message


def resolve(
    description: Description,
    *,
    mounts: Mapping[str, HostMount] | None = None,
    switchboard: SwitchboardAccess | None = None,
    identity: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Open every capability of ``description`` and compile its confinement.

    ``switchboard`` resolves ``!server``/``!client``/``!connect`` (without
    one they are a :class:`ResolveError`); ``identity`` are the labels every
    ``!server`` handle carries and the program cannot override (default
    ``{program: NAME}``, the description's name).

    Raises :class:`ProgramNotFound`, :class:`ProgramNotExecutable`,
    :class:`ResolveError`, :class:`~supervisor.errors.PolicyError` or
    :class:`ConfinementError`; on any of them every fd opened is closed.
    """
    program = check_program(description)
    resolver = _Resolver(description, mounts or {}, switchboard, identity)
    ruleset: landlock.Ruleset | None = None
    try:
        plan = _place(description, resolver, program)
        _check_nproc_binds(description, plan.degraded)
        plan.compiled_policy = policy.compiled(
            description.policy, relative_to=description.directory
        )
        runtime = runtime_set(program, env=_plain_env(description), extra=description.runtime)
        plan.runtime = runtime.report()
        ruleset = _landlock(description, runtime.grants, resolver.grants, plan.degraded)
        plan.ruleset = ruleset
        return plan
    except BaseException:
        if ruleset is not None:
            ruleset.close()
        for fd in resolver.owned:
            _close(fd)
        for pipe in resolver.log_pipes:
            _close(pipe.read_fd)
        raise


def _plain_env(description: Description) -> dict[str, str]:
    return {k: v for k, v in description.env.items() if isinstance(v, str)}


def _place(description: Description, resolver: _Resolver, program: str) -> LaunchPlan:
    order: list[tuple[str, tags.Capability]] = [
        ("stdin", description.stdin),
        ("stdout", description.stdout),
        ("stderr", description.stderr),
        *description.fds.items(),
    ]
    target_of: dict[int, int] = {}
    placed: list[PlacedFd] = []
    sources: list[int] = []

    def place(name: str, cap: tags.Capability) -> int:
        if id(cap) in target_of and name not in ("stdin", "stdout", "stderr"):
            return target_of[id(cap)]
        source = resolver.fd_for(cap)
        target = len(sources)
        sources.append(source)
        target_of.setdefault(id(cap), target)
        placed.append(PlacedFd(target, name, cap, resolver.summaries[id(cap)]))
        return target

    for name, cap in order:
        place(name, cap)

    def text(value: Arg, name: str) -> str:
        return value if isinstance(value, str) else str(place(name, value))

    argv = [program] + [text(a, f"args.{i}") for i, a in enumerate(description.args)]
    env = [f"{k}={text(v, f'env.{k}')}" for k, v in description.env.items()]
    listen = placed[3:]
    if listen:
        env += [
            f"LISTEN_FDS={len(listen)}",
            "LISTEN_FDNAMES=" + ":".join(p.name for p in listen),
        ]
    return LaunchPlan(
        description=description,
        program=program,
        argv=argv,
        env=env,
        placed=placed,
        sources=sources,
        log_pipes=resolver.log_pipes,
        rlimits=[_rlimit(name, value) for name, value in description.limits.items()],
        compiled_policy=None,
        ruleset=None,
        runtime=[],
        _owned=resolver.owned,
    )


def _check_nproc_binds(description: Description, degraded: list[str]) -> None:
    """Fail closed when ``limits.nproc`` would not bind the program.

    Linux never applies RLIMIT_NPROC to processes whose real uid is root in
    the initial user namespace, whatever their capabilities (copy_process
    checks ``INIT_USER``), and the child runs with the supervisor's uid.
    """
    if "nproc" not in description.limits or os.getuid() != 0:
        return
    message = (
        "limits.nproc does not bind a program running as root (Linux exempts uid 0 "
        "from RLIMIT_NPROC)"
    )
    if description.degrade != "allow":
        raise ConfinementError(
            _at(
                description.at("limits"),
                f"{message}; run capvisor as an unprivileged user, use limits.pids under "
                "`capvisor up` where the pids cgroup controller is available, "
                "or set `degrade: allow` to run without the limit",
            )
        )
    degraded.append(f"{message}; process count unlimited")


def _rlimit(name: str, value: int) -> Rlimit:
    limit = resource.RLIM_INFINITY if value < 0 else value
    return Rlimit(_RLIMITS[name], limit, limit)


#: Landlock ABI that has everything the security model relies on: file
#: system rights (1), TCP (4) and scoping of abstract sockets and signals (6).
FULL_LANDLOCK_ABI = 6


def _landlock(
    description: Description,
    runtime_grants: tuple[landlock.PathGrant, ...],
    mount_grants: list[landlock.PathGrant],
    degraded: list[str],
) -> landlock.Ruleset | None:
    abi = landlock.abi_version()
    allow = description.degrade == "allow"
    where = description.at("degrade") or description.at("program")
    if abi == 0:
        if not allow:
            raise ConfinementError(
                _at(
                    where,
                    "Landlock is not available on this kernel; "
                    "set `degrade: allow` to run without it (mounts are then NOT read-only)",
                )
            )
        degraded.append("landlock: unavailable; file system, TCP, signal and socket scoping off")
        return None
    if abi < FULL_LANDLOCK_ABI:
        if not allow:
            raise ConfinementError(
                _at(
                    where,
                    f"Landlock ABI {abi} lacks signal and abstract-socket scoping "
                    f"(ABI {FULL_LANDLOCK_ABI}, Linux 6.12); set `degrade: allow` to accept that",
                )
            )
        degraded.append(f"landlock: ABI {abi}; scoping of signals and abstract sockets off")
    try:
        return landlock.build_ruleset([*runtime_grants, *mount_grants], abi=abi)
    except ResolveError as exc:
        if exc.location is None:
            raise ResolveError(description.at("runtime"), exc.message) from exc
        raise
