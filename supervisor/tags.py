"""Capability tags: the YAML tags a description uses to ask for an fd.

Each tag is parsed into a frozen value (:class:`Log`, :class:`Mount`, ...)
that carries where it was written. Parsing checks shape and values only: it
never opens a file (that is :mod:`supervisor.resolve`'s job).

Tag names: the short form ``!mount``, the long form
``tag:capvisor.dev,2026:mount``, and cloudabi-run's
``tag:nuxi.nl,2015:cloudabi/fd`` (and ``/file``, ``/socket``,
``/executable``) are all accepted.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar

from .errors import Location
from .yamlsrc import Source, key_text, scalar_text, suggest, tag_of, unknown_key

LONG_PREFIX = "tag:capvisor.dev,2026:"
CLOUDABI_PREFIX = "tag:nuxi.nl,2015:cloudabi/"

StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Address:
    """A socket address: ``tcp:HOST:PORT``, ``udp:HOST:PORT``, ``unix:/path``, ``unix:@name``."""

    scheme: Literal["tcp", "udp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""
    abstract: bool = False

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{'@' if self.abstract else ''}{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"


@dataclass(frozen=True, eq=False)
class Capability:
    """Base of every capability request; ``location`` is where its tag stands.

    Compared by identity: a YAML alias (``*name``) of a tagged node is the
    same capability and so the same fd.
    """

    location: Location | None = field(default=None, kw_only=True)

    @property
    def tag(self) -> str:
        return "!" + TAG_NAMES[type(self)]


@dataclass(frozen=True, eq=False)
class Log(Capability):
    """The write end of a pipe pumped into the program's log."""

    stream: StreamName


@dataclass(frozen=True, eq=False)
class Mount(Capability):
    """A directory fd plus a Landlock rule for its tree.

    Either ``path`` (standalone) or ``name`` (a mount of the enclosing
    context, such as a CRI container mount named by its container path).
    """

    path: str | None = None
    name: str | None = None
    mode: Literal["ro", "rw"] = "ro"


@dataclass(frozen=True, eq=False)
class File(Capability):
    """An open file."""

    path: str
    mode: Literal["r", "w", "a", "rw"] = "r"
    create: bool = False


@dataclass(frozen=True, eq=False)
class Socket(Capability):
    """A socket bound (and listening, for stream kinds) or connected."""

    bind: Address | None = None
    connect: Address | None = None
    type: Literal["stream", "dgram", "seqpacket"] = "stream"
    backlog: int = 128


@dataclass(frozen=True, eq=False)
class Server(Capability):
    """A switchboard handle that may only start servers, with fixed labels."""

    labels: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class Client(Capability):
    """A switchboard handle that may only connect to matching servers."""

    labels: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class Connect(Capability):
    """A stream socket already connected to the matching switchboard server."""

    labels: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class Fd(Capability):
    """One of the supervisor's own fds (CLI only): 0, 1, 2 or a number."""

    number: int


@dataclass(frozen=True, eq=False)
class Executable(Capability):
    """An fd of the program's own binary, for re-exec."""


TAG_NAMES: dict[type[Capability], str] = {
    Log: "log",
    Mount: "mount",
    File: "file",
    Socket: "socket",
    Server: "server",
    Client: "client",
    Connect: "connect",
    Fd: "fd",
    Executable: "executable",
}
_CLOUDABI_ALIASES = {"fd": "fd", "file": "file", "socket": "socket", "executable": "executable"}


def tag_name(tag: str) -> str | None:
    """Our short name for a written tag (``"!mount"`` → ``"mount"``), None if foreign."""
    if tag.startswith(LONG_PREFIX):
        return tag[len(LONG_PREFIX) :]
    if tag.startswith(CLOUDABI_PREFIX):
        return _CLOUDABI_ALIASES.get(tag[len(CLOUDABI_PREFIX) :], tag)
    if tag.startswith("!") and not tag.startswith("!!"):
        return tag[1:]
    return None


@dataclass(frozen=True)
class Context:
    """What the surrounding description allows.

    ``allow_fd``: ``!fd`` is only meaningful for the CLI. ``mounts``: the
    mounts a scalar ``!mount NAME`` may name (None outside a CRI container).
    """

    allow_fd: bool = True
    mounts: Mapping[str, Any] | None = None


#: The context of a description run from the command line.
STANDALONE = Context()


class _TagReader:
    """Parses one tagged node, reporting problems into a :class:`Source`."""

    def __init__(self, source: Source, node: Any, location: Location | None, tag: str) -> None:
        self.source = source
        self.node = node
        self.location = location
        self.tag = tag
        self.ok = True

    def error(self, location: Location | None, message: str) -> None:
        self.ok = False
        self.source.error(location or self.location, message)

    def mapping(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> CommentedMap:
        if not isinstance(self.node, CommentedMap):
            self.error(None, f"{self.tag} takes a mapping with keys {', '.join(allowed)}")
            return CommentedMap()
        for key in self.node:
            if key not in allowed:
                self.error(self.source.key_at(self.node, key), unknown_key(key, self.tag, allowed))
        for key in required:
            if key not in self.node:
                self.error(None, f"{self.tag} needs {key!r}")
        return self.node

    def string(self, node: CommentedMap, key: str) -> str | None:
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or tag_of(value):
            self.error(self.source.value_at(node, key), f"{self.tag}: {key!r} must be a string")
            return None
        return str(value)

    def choice(self, node: CommentedMap, key: str, choices: tuple[str, ...], default: str) -> str:
        value = node.get(key, default)
        if value not in choices:
            self.error(
                self.source.value_at(node, key),
                f"{self.tag}: {key} must be one of {', '.join(choices)}, not {value!r}",
            )
            return default
        return str(value)

    def path(self, node: CommentedMap, key: str) -> str:
        path = self.string(node, key)
        if path == "":
            self.error(self.source.value_at(node, key), f"{self.tag}: path must not be empty")
        return path or ""

    def labels(self) -> dict[str, str]:
        if isinstance(self.node, TaggedScalar) and scalar_text(self.node) == "":
            return {}
        if not isinstance(self.node, CommentedMap):
            self.error(
                None, f"{self.tag} takes a mapping of labels, e.g. {self.tag} {{service: api}}"
            )
            return {}
        labels: dict[str, str] = {}
        for key, value in self.node.items():
            if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                self.error(
                    self.source.key_at(self.node, key),
                    f"{self.tag}: bad label name {key_text(key)}",
                )
            elif isinstance(value, bool) or not isinstance(value, str | int):
                self.error(
                    self.source.value_at(self.node, key),
                    f"{self.tag}: label {key!r} must have a string value",
                )
            else:
                labels[key] = str(value)
        return labels


_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,252}")
_FD_NAMES = {"stdin": 0, "stdout": 1, "stderr": 2}


def _parse_log(r: _TagReader, ctx: Context) -> Capability | None:
    stream = scalar_text(r.node) if not isinstance(r.node, CommentedMap | CommentedSeq) else None
    if stream not in ("stdout", "stderr"):
        r.error(None, f"!log takes stdout or stderr, not {stream!r}")
        return None
    return Log(stream, location=r.location)  # type: ignore[arg-type]


def _parse_mount(r: _TagReader, ctx: Context) -> Capability | None:
    if isinstance(r.node, TaggedScalar):
        name = scalar_text(r.node)
        if ctx.mounts is None:
            r.error(
                None,
                f"!mount {name} names a mount of the enclosing container; "
                "a standalone description uses !mount {path: /dir, mode: ro}",
            )
            return None
        if name not in ctx.mounts:
            known = ", ".join(sorted(ctx.mounts)) or "none"
            r.error(None, f"!mount {name}: no such container mount (mounts: {known})")
            return None
        return Mount(name=name, location=r.location)
    node = r.mapping(("path", "mode"), required=("path",))
    path = r.path(node, "path")
    mode = r.choice(node, "mode", ("ro", "rw"), "ro")
    return Mount(path=path, mode=mode, location=r.location) if r.ok else None  # type: ignore[arg-type]


def _parse_file(r: _TagReader, ctx: Context) -> Capability | None:
    if isinstance(r.node, TaggedScalar):
        path = scalar_text(r.node)
        if not path:
            r.error(None, "!file needs a path: !file PATH or !file {path: PATH, mode: r}")
            return None
        return File(path, location=r.location)
    node = r.mapping(("path", "mode", "create"), required=("path",))
    path = r.path(node, "path")
    mode = r.choice(node, "mode", ("r", "w", "a", "rw"), "r")
    create = node.get("create", False)
    if not isinstance(create, bool):
        r.error(r.source.value_at(node, "create"), "!file: create must be true or false")
    elif create and mode == "r":
        r.error(
            r.source.value_at(node, "create"), "!file: create needs a writable mode (w, a or rw)"
        )
    if not r.ok:
        return None
    return File(path, mode=mode, create=bool(create), location=r.location)  # type: ignore[arg-type]


def parse_address(text: str) -> Address:
    """Parse ``tcp:HOST:PORT`` and friends; raises ValueError with the reason."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("tcp", "udp", "unix"):
        raise ValueError(f"address {text!r} must start with tcp:, udp: or unix:")
    if scheme == "unix":
        if rest.startswith("@") and len(rest) > 1:
            return Address("unix", path=rest[1:], abstract=True)
        if not rest.startswith("/"):
            raise ValueError(f"unix address {text!r} must be unix:/path or unix:@name")
        if len(rest.encode()) > 107:
            raise ValueError(f"unix socket path is longer than 107 bytes: {rest!r}")
        return Address("unix", path=rest)
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]:")
        if not bracket:
            raise ValueError(f"address {text!r}: IPv6 form is {scheme}:[::1]:PORT")
    else:
        host, _, port_text = rest.rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"address {text!r}: host must be an IP address or localhost") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number from 0 to 65535")
    return Address(scheme, host=host, port=int(port_text))  # type: ignore[arg-type]


def _parse_socket(r: _TagReader, ctx: Context) -> Capability | None:
    node = r.mapping(("bind", "connect", "type", "backlog"))
    addresses: dict[str, Address] = {}
    for key in ("bind", "connect"):
        text = r.string(node, key)
        if text is None:
            continue
        try:
            addresses[key] = parse_address(text)
        except ValueError as exc:
            r.error(r.source.value_at(node, key), f"!socket: {exc}")
    if ("bind" in node) == ("connect" in node):
        r.error(None, "!socket needs exactly one of bind or connect")
    kind = r.choice(node, "type", ("stream", "dgram", "seqpacket"), "stream")
    backlog = node.get("backlog", 128)
    if isinstance(backlog, bool) or not isinstance(backlog, int) or not 0 < backlog <= 65535:
        r.error(
            r.source.value_at(node, "backlog"), "!socket: backlog must be a number from 1 to 65535"
        )
    for address in addresses.values():
        if address.scheme == "udp" and kind != "dgram":
            if "type" in node:
                r.error(r.source.value_at(node, "type"), "!socket: udp addresses need type dgram")
            kind = "dgram"
        elif address.scheme == "tcp" and kind != "stream":
            r.error(r.source.value_at(node, "type"), "!socket: tcp addresses need type stream")
    if not r.ok:
        return None
    return Socket(
        bind=addresses.get("bind"),
        connect=addresses.get("connect"),
        type=kind,  # type: ignore[arg-type]
        backlog=int(backlog),
        location=r.location,
    )


def _labels_parser(
    cls: type[Server | Client | Connect],
) -> Callable[[_TagReader, Context], Capability | None]:
    def parse(r: _TagReader, ctx: Context) -> Capability | None:
        labels = r.labels()
        return cls(labels, location=r.location) if r.ok else None

    return parse


def _parse_fd(r: _TagReader, ctx: Context) -> Capability | None:
    if not ctx.allow_fd:
        r.error(None, "!fd is only allowed in descriptions run from the command line")
        return None
    text = scalar_text(r.node)
    if text in _FD_NAMES:
        return Fd(_FD_NAMES[text], location=r.location)
    if text.isdigit():
        return Fd(int(text), location=r.location)
    r.error(None, f"!fd takes stdin, stdout, stderr or a number, not {text!r}")
    return None


def _parse_executable(r: _TagReader, ctx: Context) -> Capability | None:
    if scalar_text(r.node) != "" or not isinstance(r.node, TaggedScalar):
        r.error(None, "!executable takes no value")
        return None
    return Executable(location=r.location)


_PARSERS: dict[str, Callable[[_TagReader, Context], Capability | None]] = {
    "log": _parse_log,
    "mount": _parse_mount,
    "file": _parse_file,
    "socket": _parse_socket,
    "server": _labels_parser(Server),
    "client": _labels_parser(Client),
    "connect": _labels_parser(Connect),
    "fd": _parse_fd,
    "executable": _parse_executable,
}
KNOWN_TAGS = tuple("!" + name for name in _PARSERS)


def is_tagged(node: Any) -> bool:
    """Whether ``node`` carries a tag that is not a plain YAML one."""
    tag = tag_of(node)
    return tag is not None and not tag.startswith("tag:yaml.org,2002:")


def parse_capability(
    node: Any, source: Source, location: Location | None, context: Context = STANDALONE
) -> Capability | None:
    """Parse the tagged ``node`` into a capability; None after reporting a problem."""
    tag = tag_of(node) or ""
    name = tag_name(tag)
    parser = _PARSERS.get(name or "")
    if parser is None:
        source.error(location, f"unknown tag {tag}{suggest(tag, KNOWN_TAGS)}")
        return None
    return parser(_TagReader(source, node, location, "!" + (name or "")), context)
