"""Reading YAML 1.2 with locations, for descriptions and policies.

ruamel.yaml's round-trip loader keeps 0-based line/column marks on maps and
sequences and keeps unknown tags as tagged nodes. :class:`Source` turns those
marks into :class:`~supervisor.errors.Location` values and collects
:class:`~supervisor.errors.Problem` values so a whole file is checked before
anything is reported.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

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
                self.error(self.key_at(node, key), unknown_key(key, what, allowed))


def key_text(key: Any) -> str:
    """A key for a message: ``'name'``, or ``{…}``/``[…]`` for a mapping/sequence key."""
    if isinstance(key, Mapping):
        return "{…}"
    if isinstance(key, tuple | list):
        return "[…]"
    return repr(key)


def unknown_key(key: Any, what: str, allowed: Iterable[str]) -> str:
    """The message for a key of ``what`` that is not one of ``allowed``."""
    if isinstance(key, Mapping):
        return f"a mapping cannot be a key in {what} (keys: {', '.join(allowed)})"
    if isinstance(key, tuple | list):
        return f"a sequence cannot be a key in {what} (keys: {', '.join(allowed)})"
    return f"unknown key {key!r} in {what}{suggest(str(key), allowed)}"


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


class _Constructor(RoundTripConstructor):
    """ruamel's round-trip constructor, with a quiet ``construct_unknown``.

    ruamel's own catches everything, GeneratorExit included, and raises
    ConstructorError instead: when a load fails part-way (``[!x a, !!int
    b]``) the half-run generator is collected later and Python prints
    "Exception ignored in ... construct_unknown" and a traceback to the
    user's stderr. This one closes it quietly.
    """

    def construct_unknown(self, node: Any) -> Iterator[Any]:
        generator = super().construct_unknown(node)
        try:
            yield next(generator)
        except GeneratorExit:
            with contextlib.suppress(ConstructorError):
                generator.close()
            raise
        yield from generator


_Constructor.add_constructor(None, _Constructor.construct_unknown)


def load_yaml(text: str, source: Source) -> Any:
    """Parse ``text``; a syntax error becomes one problem and None is returned.

    So do characters YAML forbids, a core tag its value does not fit
    (``!!int x``) and escapes of lone surrogates, each with its location.
    """
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    yaml.allow_duplicate_keys = False
    try:
        with warnings.catch_warnings():
            # YAML 1.2 lets a later anchor of the same name replace the first.
            warnings.simplefilter("ignore", ReusedAnchorWarning)
            document = yaml.load(text)
        before = len(source.problems)
        _no_surrogates(document, source, Location(source.filename, 1, 1), set())
        if len(source.problems) == before:
            return document
    except ReaderError as exc:
        # A character YAML does not allow (NUL, most controls): ruamel gives an offset.
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        source.error(
            source.location(line, column),
            f"invalid YAML: character U+{exc.character:04X} is not allowed",
        )
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = source.location(mark.line, mark.column) if mark is not None else None
        message = exc.problem or exc.context or "invalid YAML"
        if "duplicate key" in message:
            message = message.split(" with value")[0]
        source.error(where, f"invalid YAML: {message}")
    except YAMLError as exc:
        source.error(None, f"invalid YAML: {exc}")
    except (ValueError, KeyError, IndexError) as exc:
        # ruamel's constructors fail this way on a core tag that does not fit
        # its value (`!!int x`, `!!bool x`); find the node to point at.
        source.error(
            _unconstructible(text, source), f"invalid YAML: the value does not fit its tag ({exc})"
        )
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(node: Any, source: Source, where: Location | None, seen: set[int]) -> None:
    """Report strings holding a lone UTF-16 surrogate (a `"\\ud800"` escape): no file
    name, syscall or label can contain one."""
    if isinstance(node, str) or isinstance(getattr(node, "value", None), str):
        text = node if isinstance(node, str) else node.value
        if _SURROGATE.search(text):
            source.error(
                where, "invalid YAML: a \\u escape names a lone surrogate, not a character"
            )
        return
    if id(node) in seen or not isinstance(node, CommentedMap | CommentedSeq):
        return
    seen.add(id(node))
    if isinstance(node, CommentedMap):
        for key, value in node.items():
            _no_surrogates(key, source, source.key_at(node, key), seen)
            _no_surrogates(value, source, source.value_at(node, key), seen)
    else:
        for i, value in enumerate(node):
            _no_surrogates(value, source, source.value_at(node, i), seen)


def _unconstructible(text: str, source: Source) -> Location | None:
    """Where the first scalar in ``text`` that its tag's constructor refuses starts."""
    scan = YAML(typ="rt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedAnchorWarning)
        pending, seen = [scan.compose(text)], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            try:
                scan.constructor.construct_object(node, deep=True)
            except (ValueError, KeyError, IndexError):
                return source.location(node.start_mark.line, node.start_mark.column)
        elif isinstance(node, SequenceNode):
            pending.extend(reversed(node.value))
        elif isinstance(node, MappingNode):
            pending.extend(n for pair in reversed(node.value) for n in reversed(pair))
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
