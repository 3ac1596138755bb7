"""Set files for ``capvisor up``: several programs, their order, where state goes.

```yaml
state: .capvisor          # state directory (SQLite, control socket); default .capvisor-STEM
logs: logs                # program logs: logs/NAME.log; default STATE/logs
switchboard: true         # run the built-in broker for !server/!client/!connect
programs:
  db:   {description: db.yaml}                      # by path
  web:                                              # inline: a description...
    program: /usr/bin/web
    args: [--port-fd, !socket {bind: "tcp:127.0.0.1:8080"}]
    after: [db]                                     # ...plus `after`
```

Paths are relative to the set file's directory. Every problem of the file,
and of each description it names, is reported at once with FILE:LINE:COL
(:class:`~supervisor.errors.DescriptionError`). Nothing here opens
anything but the files it reads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from .description import Description, load_description, read_description_node
from .errors import DescriptionError, Location
from .tags import Context
from .yamlsrc import Source, key_text, load_yaml, read_text

TOP_LEVEL_KEYS = ("state", "logs", "socket", "switchboard", "programs")
#: Descriptions run by ``up`` may not use ``!fd`` (the supervisor's own fds).
CONTEXT = Context(allow_fd=False)


@dataclass(frozen=True)
class UpProgram:
    """One program of a set file: its checked description and its text for the service."""

    name: str
    description: Description
    text: str  # the description as YAML, stored by the service
    file: str  # where the description came from (relative paths are relative to it)
    after: tuple[str, ...] = ()
    location: Location | None = None


@dataclass(frozen=True)
class UpFile:
    """A checked set file. ``programs`` are in start order (``after`` respected)."""

    path: Path
    state_dir: Path
    log_dir: Path
    socket: Path
    switchboard: bool
    programs: dict[str, UpProgram]


def socket_path(path: str | Path) -> Path:
    """The control socket of the set file ``path``, read leniently.

    Only ``state`` and ``socket`` are looked at, so a client finds a running
    supervisor even while the file has problems elsewhere (``reload`` then
    gets them from the supervisor). Raises :class:`DescriptionError` if the
    file cannot be read or parsed at all.
    """
    path = Path(path).absolute()
    source = Source(str(path))
    text = read_text(path, source)
    document = load_yaml(text, source) if text is not None else None
    if source.problems:
        raise DescriptionError(source.problems)
    doc = document if isinstance(document, CommentedMap) else CommentedMap()
    reader = _Reader(path, source)
    state = reader.path_value(doc, "state", path.parent / f".capvisor-{path.stem}")
    sock = reader.path_value(doc, "socket", state / "control.sock")
    if source.problems:
        raise DescriptionError(source.problems)
    return sock


def load_upfile(path: str | Path) -> UpFile:
    """Read and check the set file ``path`` and every description it names.

    Raises :class:`DescriptionError` with all problems found.
    """
    path = Path(path).absolute()
    source = Source(str(path))
    text = read_text(path, source)
    document = load_yaml(text, source) if text is not None else None
    result = None
    if not source.problems:
        result = _Reader(path, source).read(document)
    if source.problems or result is None:
        raise DescriptionError(source.problems)
    return result


class _Reader:
    def __init__(self, path: Path, source: Source) -> None:
        self.path = path
        self.base = path.parent
        self.source = source
        self.dumper = YAML(typ="rt")

    def error(self, location: Location | None, message: str) -> None:
        self.source.error(location, message)

    def path_value(self, doc: CommentedMap, key: str, default: Path) -> Path:
        if key not in doc:
            return default
        value = doc[key]
        if not isinstance(value, str) or not value:
            self.error(self.source.value_at(doc, key), f"{key} must be a path")
            return default
        return self.base / value

    def read(self, doc: Any) -> UpFile | None:
        if not isinstance(doc, CommentedMap):
            self.error(
                Location(self.source.filename, 1, 1), "a set file is a mapping with 'programs'"
            )
            return None
        self.source.unknown_keys(doc, TOP_LEVEL_KEYS, "set file")
        state = self.path_value(doc, "state", self.base / f".capvisor-{self.path.stem}")
        logs = self.path_value(doc, "logs", state / "logs")
        sock = self.path_value(doc, "socket", state / "control.sock")
        switchboard = doc.get("switchboard", False)
        if not isinstance(switchboard, bool):
            self.error(
                self.source.value_at(doc, "switchboard"), "switchboard must be true or false"
            )
            switchboard = False
        programs = doc.get("programs")
        if not isinstance(programs, CommentedMap) or not programs:
            where = self.source.value_at(doc, "programs") if "programs" in doc else None
            self.error(
                where or Location(self.source.filename, 1, 1),
                "programs must be a mapping of names to descriptions",
            )
            return None
        read: dict[str, UpProgram] = {}
        for name, node in programs.items():
            program = self.program(programs, name, node)
            if program is not None:
                read[name] = program
        if self.source.problems:
            return None
        ordered = self.order(read)
        if ordered is None:
            return None
        return UpFile(self.path, state, logs, sock, bool(switchboard), ordered)

    def program(self, programs: CommentedMap, name: Any, node: Any) -> UpProgram | None:
        key_at = self.source.key_at(programs, name)
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            self.error(key_at, f"bad program name {key_text(name)} (letters, digits, '-', '_')")
            return None
        if not isinstance(node, CommentedMap):
            self.error(
                self.source.value_at(programs, name),
                f"programs.{name} must be a description or {{description: PATH}}",
            )
            return None
        after = self.after(node, name)
        for dep in after:
            if dep not in programs:
                self.error(key_at, f"programs.{name}.after: no program {dep!r}")
        if "description" in node:
            self.source.unknown_keys(node, ("description", "after"), f"programs.{name}")
            ref = node["description"]
            if not isinstance(ref, str):
                self.error(self.source.value_at(node, "description"), "description must be a path")
                return None
            file = self.base / ref
            if not file.is_file():
                self.error(
                    self.source.value_at(node, "description"),
                    f"programs.{name}.description: no such file: {file}",
                )
                return None
            try:
                description = load_description(file, context=CONTEXT)
            except DescriptionError as exc:
                self.source.problems.extend(exc.problems)
                return None
            except OSError as exc:
                self.error(self.source.value_at(node, "description"), f"{file}: {exc.strerror}")
                return None
            text = file.read_text()
            return UpProgram(name, description, text, str(file), after, key_at)
        # Inline: the node is a description; `after` is ours, `name` defaults to the key.
        if "name" not in node:
            node.insert(0, "name", name)
        description = read_description_node(node, self.source, context=CONTEXT)
        if description is None:
            return None
        buffer = io.StringIO()
        self.dumper.dump(node, buffer)
        return UpProgram(name, description, buffer.getvalue(), str(self.path), after, key_at)

    def after(self, node: CommentedMap, name: str) -> tuple[str, ...]:
        if "after" not in node:
            return ()
        value = node["after"]
        location = self.source.value_at(node, "after")
        del node["after"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, CommentedSeq | list) or not all(isinstance(v, str) for v in value):
            self.error(location, f"programs.{name}.after must be a list of program names")
            return ()
        return tuple(value)

    def order(self, read: dict[str, UpProgram]) -> dict[str, UpProgram] | None:
        """Depth-first topological order; a cycle is a problem."""
        ordered: dict[str, UpProgram] = {}
        visiting: list[str] = []

        def visit(name: str) -> bool:
            if name in ordered:
                return True
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name) :], name])
                self.error(read[name].location, f"programs: 'after' forms a cycle: {cycle}")
                return False
            visiting.append(name)
            ok = all(visit(dep) for dep in read[name].after)
            visiting.pop()
            if ok:
                ordered[name] = read[name]
            return ok

        for name in read:
            if not visit(name):
                return None
        return ordered
