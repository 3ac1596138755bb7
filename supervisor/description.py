"""Program descriptions: YAML with capability tags → :class:`Description`.

``load_description(path)`` reads a file and checks all of it before
reporting: every problem (unknown key or tag, wrong type, bad value, a tag
where the context forbids it) is collected with its file, line and column
and raised together as one :class:`~supervisor.errors.DescriptionError`.
Nothing here opens the files or sockets a description names.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from .errors import DescriptionError, Location
from .tags import (
    STANDALONE,
    Capability,
    Client,
    Context,
    Executable,
    File,
    Log,
    Mount,
    Server,
    is_tagged,
    parse_capability,
)
from .yamlsrc import Source, key_text, load_yaml, read_text, suggest

Arg = str | Capability

TOP_LEVEL_KEYS = (
    "name",
    "program",
    "args",
    "env",
    "cwd",
    "stdin",
    "stdout",
    "stderr",
    "fds",
    "policy",
    "limits",
    "runtime",
    "degrade",
    "restart",
    "stop",
    "log",
    "audit",
)

#: rlimit names accepted under ``limits:`` and their kind of value.
LIMITS: dict[str, Literal["count", "size", "seconds"]] = {
    "as": "size",
    "core": "size",
    "cpu": "seconds",
    "data": "size",
    "fsize": "size",
    "memlock": "size",
    "nofile": "count",
    "nproc": "count",
    "stack": "size",
}

#: Limits enforced through the program's cgroup v2 (``capvisor up``, service.py),
#: not setrlimit: ``memory`` (memory.max) and ``pids`` (pids.max).
CGROUP_LIMITS: dict[str, Literal["count", "size"]] = {"memory": "size", "pids": "count"}

_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_FD_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a program and how long to wait in between."""

    policy: Literal["no", "on-failure", "always"] = "no"
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    #: Crash loop: after ``limit`` restarts in a row, none of which ran for
    #: ``stable`` seconds, the program is ``failed`` (service.py, restart.py).
    limit: int = 5
    stable: float = 10.0


@dataclass(frozen=True)
class StopPolicy:
    """How to stop a program: this signal, then SIGKILL after ``timeout`` seconds."""

    signal: int = signal.SIGTERM
    timeout: float = 10.0


@dataclass(frozen=True)
class LogSettings:
    """``log: {path, max_size, max_files}``: where ``capvisor run`` writes the log.

    ``path`` is relative to the description's directory; ``max_size`` None
    means no rotation (docs/logs.md).
    """

    path: str | None = None
    max_size: int | None = None
    max_files: int = 5


@dataclass(frozen=True)
class Description:
    """A checked program description. Capabilities are still unresolved requests."""

    source: str
    name: str
    program: str
    args: tuple[Arg, ...] = ()
    env: Mapping[str, Arg] = field(default_factory=dict)
    cwd: str = "/"
    stdin: Capability = field(default_factory=lambda: File("/dev/null"))
    stdout: Capability = field(default_factory=lambda: Log("stdout"))
    stderr: Capability = field(default_factory=lambda: Log("stderr"))
    fds: Mapping[str, Capability] = field(default_factory=dict)
    policy: str = "default"
    limits: Mapping[str, int] = field(default_factory=dict)
    cgroup_limits: Mapping[str, int] = field(default_factory=dict)
    runtime: tuple[str, ...] = ()
    degrade: Literal["deny", "allow"] = "deny"
    restart: RestartPolicy = RestartPolicy()
    stop: StopPolicy = StopPolicy()
    log: LogSettings = LogSettings()
    #: Report every syscall the policy denies in the program's log (docs/policies.md).
    audit: bool = False
    locations: Mapping[str, Location] = field(default_factory=dict, compare=False)

    @property
    def directory(self) -> Path:
        """Where relative paths in the description (such as a policy) are looked up."""
        return Path(self.source).resolve().parent

    def at(self, key: str) -> Location | None:
        """Where top-level ``key`` was written, if it was."""
        return self.locations.get(key)


def load_description(path: str | Path, *, context: Context = STANDALONE) -> Description:
    """Read and check the description in ``path``.

    Raises :class:`DescriptionError` carrying every problem of the file.
    """
    path = Path(path)
    source = Source(str(path))
    text = read_text(path, source)
    if text is None:
        raise DescriptionError(source.problems)
    return parse_description(text, str(path), context=context)


def parse_description(text: str, filename: str, *, context: Context = STANDALONE) -> Description:
    """Check the description ``text`` (named ``filename`` in errors)."""
    source = Source(filename)
    document = load_yaml(text, source)
    description = None
    if not source.problems:
        description = _DescriptionReader(source, context).read(document)
    if source.problems or description is None:
        raise DescriptionError(source.problems)
    return description


def read_description_node(
    node: Any, source: Source, *, context: Context = STANDALONE
) -> Description | None:
    """Check an already loaded YAML ``node`` (e.g. a program inline in a larger file).

    Problems go to ``source`` (with their lines in that file); returns None
    if there were any. Used by ``capvisor up`` (supervisor/upfile.py).
    """
    before = len(source.problems)
    description = _DescriptionReader(source, context).read(node)
    return description if len(source.problems) == before else None


class _DescriptionReader:
    def __init__(self, source: Source, context: Context) -> None:
        self.source = source
        self.context = context
        self.parsed: dict[int, Capability | None] = {}

    def capability(self, node: Any, location: Location | None) -> Capability | None:
        """Parse a tagged node once: a YAML alias yields the very same capability."""
        if id(node) not in self.parsed:
            self.parsed[id(node)] = parse_capability(node, self.source, location, self.context)
        return self.parsed[id(node)]

    def error(self, location: Location | None, message: str) -> None:
        self.source.error(location, message)

    def read(self, doc: Any) -> Description | None:
        if not isinstance(doc, CommentedMap):
            self.error(
                self.source.of(doc) or Location(self.source.filename, 1, 1),
                "a description is a mapping with at least a 'program' key",
            )
            return None
        self.source.unknown_keys(doc, TOP_LEVEL_KEYS, "description")
        locations = {key: loc for key in doc if (loc := self.source.key_at(doc, key))}
        program = self.plain_string(doc, "program", required=True)
        if program and not program.startswith("/"):
            self.error(
                self.source.value_at(doc, "program"),
                f"program must be an absolute path: {program!r}",
            )
        fields: dict[str, Any] = {
            "source": self.source.filename,
            "name": self.plain_string(doc, "name") or Path(self.source.filename).stem,
            "program": program or "",
            "args": self.args(doc),
            "env": self.env(doc),
            "fds": self.fds(doc),
            "limits": self.limits(doc),
            "cgroup_limits": self.cgroup_limits(doc),
            "runtime": self.runtime(doc),
            "restart": self.restart(doc),
            "stop": self.stop(doc),
            "log": self.log(doc),
            "locations": locations,
        }
        cwd = self.plain_string(doc, "cwd")
        if cwd is not None:
            if not cwd.startswith("/"):
                self.error(
                    self.source.value_at(doc, "cwd"), f"cwd must be an absolute path: {cwd!r}"
                )
            fields["cwd"] = cwd
        policy = self.plain_string(doc, "policy")
        if policy is not None:
            fields["policy"] = policy
        if "audit" in doc:
            if isinstance(doc["audit"], bool):
                fields["audit"] = doc["audit"]
            else:
                self.error(self.source.value_at(doc, "audit"), "audit must be true or false")
        degrade = self.plain_string(doc, "degrade")
        if degrade is not None:
            if degrade not in ("deny", "allow"):
                self.error(self.source.value_at(doc, "degrade"), "degrade must be deny or allow")
            fields["degrade"] = degrade
        for stream, forbidden in _STD_STREAMS.items():
            if stream in doc:
                capability = self.stdio(doc, stream, forbidden)
                if capability is not None:
                    fields[stream] = capability
        if self.source.problems:
            return None
        return Description(**fields)

    # --- plain values -----------------------------------------------------

    def plain_string(self, doc: CommentedMap, key: str, *, required: bool = False) -> str | None:
        if key not in doc:
            if required:
                self.error(Location(self.source.filename, 1, 1), f"missing required key {key!r}")
            return None
        value = doc[key]
        if is_tagged(value) or not isinstance(value, str):
            self.error(self.source.value_at(doc, key), f"{key} must be a string")
            return None
        return str(value)

    def value_or_capability(self, parent: Any, key: Any, what: str) -> Arg | None:
        value = parent[key]
        location = self.source.value_at(parent, key)
        if is_tagged(value):
            return self.capability(value, location)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.error(location, f"{what} must be a string, a number or a capability tag")
            return None
        return str(value)

    def args(self, doc: CommentedMap) -> tuple[Arg, ...]:
        node = doc.get("args")
        if node is None:
            return ()
        if not isinstance(node, CommentedSeq):
            self.error(self.source.value_at(doc, "args"), "args must be a list")
            return ()
        args = (self.value_or_capability(node, i, f"args[{i}]") for i in range(len(node)))
        return tuple(a for a in args if a is not None)

    def env(self, doc: CommentedMap) -> dict[str, Arg]:
        node = doc.get("env")
        if node is None:
            return {}
        if not isinstance(node, CommentedMap):
            self.error(self.source.value_at(doc, "env"), "env must be a mapping of names to values")
            return {}
        env: dict[str, Arg] = {}
        for key in node:
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                self.error(
                    self.source.key_at(node, key), f"bad environment variable name {key_text(key)}"
                )
                continue
            if key.startswith("LISTEN_"):
                self.error(self.source.key_at(node, key), f"{key} is set by capvisor from fds")
                continue
            value = self.value_or_capability(node, key, f"env {key}")
            if value is not None:
                env[key] = value
        return env

    def fds(self, doc: CommentedMap) -> dict[str, Capability]:
        node = doc.get("fds")
        if node is None:
            return {}
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(doc, "fds"),
                "fds must be a mapping of names to capability tags",
            )
            return {}
        fds: dict[str, Capability] = {}
        for key, value in node.items():
            location = self.source.value_at(node, key)
            if not isinstance(key, str) or not _FD_NAME.fullmatch(key):
                self.error(
                    self.source.key_at(node, key),
                    f"bad fd name {key_text(key)} (letters, digits, '_', '.', '-'; at most 255)",
                )
                continue
            if not is_tagged(value):
                self.error(location, f"fds.{key} must be a capability tag such as !file or !mount")
                continue
            capability = self.capability(value, location)
            if capability is not None:
                fds[key] = capability
        return fds

    def stdio(
        self, doc: CommentedMap, stream: str, forbidden: tuple[type, ...]
    ) -> Capability | None:
        value = doc[stream]
        location = self.source.value_at(doc, stream)
        if not is_tagged(value):
            self.error(
                location, f"{stream} must be a capability tag (e.g. !log {stream}, !file {{...}})"
            )
            return None
        capability = self.capability(value, location)
        if capability is not None and isinstance(capability, forbidden):
            self.error(location, f"{capability.tag} cannot be used as {stream}")
            return None
        return capability

    def limits(self, doc: CommentedMap) -> dict[str, int]:
        node = doc.get("limits")
        if node is None:
            return {}
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(doc, "limits"),
                "limits must be a mapping such as {nofile: 256}",
            )
            return {}
        limits: dict[str, int] = {}
        for key, value in node.items():
            kind = LIMITS.get(key)
            location = self.source.value_at(node, key)
            if key in CGROUP_LIMITS:
                continue  # read by cgroup_limits()
            if kind is None:
                self.error(
                    self.source.key_at(node, key),
                    f"unknown limit {key_text(key)}"
                    f"{suggest(str(key), {**LIMITS, **CGROUP_LIMITS})}",
                )
                continue
            parsed = parse_limit(value, kind)
            if parsed is None:
                self.error(location, f"limits.{key}: {_LIMIT_HINT[kind]}, not {value!r}")
            else:
                limits[key] = parsed
        return limits

    def cgroup_limits(self, doc: CommentedMap) -> dict[str, int]:
        node = doc.get("limits")
        if not isinstance(node, CommentedMap):
            return {}  # reported by limits()
        limits: dict[str, int] = {}
        for key, kind in CGROUP_LIMITS.items():
            if key in node:
                parsed = parse_limit(node[key], kind)
                if parsed is None:
                    self.error(
                        self.source.value_at(node, key),
                        f"limits.{key}: {_LIMIT_HINT[kind]}, not {node[key]!r}",
                    )
                else:
                    limits[key] = parsed
        return limits

    def runtime(self, doc: CommentedMap) -> tuple[str, ...]:
        node = doc.get("runtime")
        if node is None:
            return ()
        if not isinstance(node, CommentedSeq):
            self.error(
                self.source.value_at(doc, "runtime"), "runtime must be a list of absolute paths"
            )
            return ()
        paths = []
        for i, item in enumerate(node):
            if not isinstance(item, str) or is_tagged(item) or not item.startswith("/"):
                self.error(self.source.value_at(node, i), f"runtime[{i}] must be an absolute path")
            else:
                paths.append(str(item))
        return tuple(paths)

    def restart(self, doc: CommentedMap) -> RestartPolicy:
        node = doc.get("restart")
        if node is None:
            return RestartPolicy()
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(doc, "restart"), "restart must be a mapping {policy, backoff}"
            )
            return RestartPolicy()
        self.source.unknown_keys(node, ("policy", "backoff", "limit", "stable"), "restart")
        policy = node.get("policy", "no")
        if policy is False:  # YAML 1.2 keeps `no` a string; be kind to `false`
            policy = "no"
        if policy not in ("no", "on-failure", "always"):
            self.error(
                self.source.value_at(node, "policy"),
                "restart.policy must be no, on-failure or always",
            )
            policy = "no"
        low, high = 1.0, 60.0
        if "backoff" in node:
            text = str(node["backoff"])
            first, sep, second = text.partition("..")
            lo, hi = parse_duration(first), parse_duration(second if sep else first)
            if lo is None or hi is None or lo > hi:
                self.error(
                    self.source.value_at(node, "backoff"),
                    f"restart.backoff must look like 1s..60s, not {text!r}",
                )
            else:
                low, high = lo, hi
        limit = node.get("limit", 5)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            self.error(
                self.source.value_at(node, "limit"),
                f"restart.limit must be a number of restarts (0 or more), not {limit!r}",
            )
            limit = 5
        stable = parse_duration(node.get("stable", 10.0))
        if stable is None:
            self.error(
                self.source.value_at(node, "stable"),
                f"restart.stable must be a duration such as 10s, not {node['stable']!r}",
            )
            stable = 10.0
        return RestartPolicy(policy, low, high, limit, stable)

    def stop(self, doc: CommentedMap) -> StopPolicy:
        node = doc.get("stop")
        if node is None:
            return StopPolicy()
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(doc, "stop"), "stop must be a mapping {signal, timeout}"
            )
            return StopPolicy()
        self.source.unknown_keys(node, ("signal", "timeout"), "stop")
        result = StopPolicy()
        if "signal" in node:
            number = parse_signal(node["signal"])
            if number is None:
                self.error(
                    self.source.value_at(node, "signal"),
                    f"stop.signal: unknown signal {node['signal']!r}",
                )
            else:
                result = StopPolicy(number, result.timeout)
        if "timeout" in node:
            timeout = parse_duration(node["timeout"])
            if timeout is None:
                self.error(
                    self.source.value_at(node, "timeout"),
                    "stop.timeout must be a duration such as 10s",
                )
            else:
                result = StopPolicy(result.signal, timeout)
        return result

    def log(self, doc: CommentedMap) -> LogSettings:
        node = doc.get("log")
        if node is None:
            return LogSettings()
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(doc, "log"),
                "log must be a mapping {path, max_size, max_files}",
            )
            return LogSettings()
        self.source.unknown_keys(node, ("path", "max_size", "max_files"), "log")
        path = self.plain_string(node, "path")
        max_size = None
        if "max_size" in node:
            max_size = parse_size(node["max_size"])
            if not max_size:
                self.error(
                    self.source.value_at(node, "max_size"),
                    f"log.max_size must be a size such as 10M, not {node['max_size']!r}",
                )
        max_files = node.get("max_files", 5)
        if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 2:
            self.error(
                self.source.value_at(node, "max_files"),
                f"log.max_files must be a number of at least 2, not {max_files!r}",
            )
            max_files = 5
        return LogSettings(path, max_size, max_files)


#: Capabilities that make no sense as a standard stream.
_NOT_STDIO: tuple[type[Capability], ...] = (Mount, Executable, Server, Client)
_STD_STREAMS: dict[str, tuple[type[Capability], ...]] = {
    "stdin": (*_NOT_STDIO, Log),
    "stdout": _NOT_STDIO,
    "stderr": _NOT_STDIO,
}
_LIMIT_HINT = {
    "count": "expected a number or unlimited",
    "size": "expected a size such as 64M or 1G, or unlimited",
    "seconds": "expected a duration such as 60s, or unlimited",
}


def parse_size(value: Any) -> int | None:
    """``64M`` → 67108864 (binary units); a plain number is bytes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        return None
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_duration(value: Any) -> float | None:
    """``10s``, ``500ms``, ``2m``, ``1h`` or a number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    match = _DURATION.fullmatch(str(value).strip())
    if not match:
        return None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_limit(value: Any, kind: str) -> int | None:
    """A limit value in the unit setrlimit wants; -1 means unlimited."""
    if value == "unlimited":
        return -1
    if kind == "count":
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
        )
    if kind == "size":
        return parse_size(value)
    seconds = parse_duration(value)
    return None if seconds is None else max(1, round(seconds))


def parse_signal(value: Any) -> int | None:
    """``TERM``, ``SIGTERM`` or ``15`` → 15; None if unknown."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 < value < signal.NSIG else None
    name = str(value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
    return int(number) if number is not None else None
