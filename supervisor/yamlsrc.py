"""Reading YAML 1.2 with locations, for descriptions and policies.

ruamel.yaml's round-trip loader keeps 0-based line/column marks on maps and
sequences and keeps unknown tags as tagged nodes. :class:`Source` turns those
marks into :class:`~supervisor.errors.Location` values and collects
:class:`~supervisor.errors.Problem` values so a whole file is checked before
anything is reported.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .errors import Location, Problem


class Source:
    """One YAML file being read: its name, its problems, location lookups."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[Problem] = []

    def location(self, line0: int, col0: int) -> Location:
        return Location(self.filename, line0 + 1, col0 + 1)

    def of(self, node: Any) -> Location | None:
        """The location where ``node`` itself starts, when ruamel kept one."""
        lc = getattr(node, "lc", None) if isinstance(node, CommentedBase) else None
        if lc is not None and lc.line is not None:
            return self.location(lc.line, lc.col)
        return None

    def value_at(self, parent: Any, key: Any) -> Location | None:
        """The location of ``parent[key]`` (a map value or a sequence item)."""
        try:
            if isinstance(parent, CommentedMap):
                line, col = parent.lc.value(key)
            elif isinstance(parent, CommentedSeq):
                line, col = parent.lc.item(key)
            else:
                return None
        except (KeyError, IndexError, TypeError):
            return self.of(parent)
        return self.location(line, col)

    def key_at(self, parent: Any, key: Any) -> Location | None:
        """The location of the key ``key`` of the map ``parent``."""
        try:
            line, col = parent.lc.key(key)
        except (AttributeError, KeyError, TypeError):
            return self.of(parent)
        return self.location(line, col)

    def error(self, location: Location | None, message: str) -> None:
        self.problems.append(Problem(location, message))

    def unknown_keys(self, node: CommentedMap, allowed: Iterable[str], what: str) -> None:
        """Report every key of ``node`` not in ``allowed``, with a suggestion."""
        allowed = list(allowed)
        for key in node:
            if key not in allowed:
                self.error(
                    self.key_at(node, key),
                    f"unknown key {key!r} in {what}{suggest(str(key), allowed)}",
                )


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` when one of ``choices`` is close to ``word``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def tag_of(node: Any) -> str | None:
    """The tag written on ``node`` (``"!mount"``, ``"tag:…"``), or None."""
    tag = getattr(node, "tag", None)
    if tag is None:
        return None
    value = getattr(tag, "value", tag)
    return value if isinstance(value, str) and value else None


def scalar_text(node: Any) -> str:
    """The text of a scalar, tagged or not (``!log stdout`` → ``"stdout"``)."""
    if isinstance(node, TaggedScalar):
        return "" if node.value is None else str(node.value)
    return "" if node is None else str(node)


def load_yaml(text: str, source: Source) -> Any:
    """Parse ``text``; a syntax error becomes one problem and None is returned."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = source.location(mark.line, mark.column) if mark is not None else None
        message = exc.problem or exc.context or "invalid YAML"
        if "duplicate key" in message:
            message = message.split(" with value")[0]
        source.error(where, f"invalid YAML: {message}")
    except YAMLError as exc:
        source.error(None, f"invalid YAML: {exc}")
    return None


def read_text(path: Path, source: Source) -> str | None:
    """The file's text, or None with a problem naming why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        source.error(None, f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        source.error(None, f"{path}: {exc.strerror}")
    return None
