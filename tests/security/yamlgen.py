"""Hypothesis strategies for YAML documents with tags, anchors and odd scalars.

A document is built as a small tree and written out by :func:`emit` (flow
style inside, block style at the top), so the fuzzers reach the description
and policy readers with shapes a YAML library's own dumper would never make:
unknown and long-form tags, tags on the wrong kind of node, aliases to
missing or enclosing anchors, keys that are not strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class Tagged:
    tag: str
    node: object  # None: the tag stands alone (an empty scalar)


@dataclass(frozen=True)
class Anchor:
    name: str
    node: object


@dataclass(frozen=True)
class Alias:
    name: str


@dataclass(frozen=True)
class Plain:
    """A scalar written as is (a number, a word, something YAML must parse)."""

    text: str


def emit(node: object) -> str:
    """``node`` in YAML flow style."""
    if isinstance(node, Tagged):
        tag = node.tag if node.tag.startswith("!") else f"!<{node.tag}>"
        return tag + ("" if node.node is None else " " + emit(node.node))
    if isinstance(node, Anchor):
        return f"&{node.name} {emit(node.node)}"
    if isinstance(node, Alias):
        return f"*{node.name}"
    if isinstance(node, Plain):
        return node.text
    if isinstance(node, dict):
        return "{" + ", ".join(f"{emit(k)}: {emit(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(emit(v) for v in node) + "]"
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, (int, float)):
        return repr(node)
    return json.dumps(node)  # a JSON string is a YAML double-quoted scalar


def emit_document(top: object) -> str:
    """A top-level mapping in block style (one key a line); anything else in flow style."""
    if isinstance(top, dict):
        return "".join(f"{emit(k)}: {emit(v)}\n" for k, v in top.items())
    return emit(top) + "\n"


def documents(
    keys: list[str], words: list[str], tags: list[str], *, max_leaves: int = 25
) -> st.SearchStrategy[str]:
    """YAML text: a mapping of ``keys`` (and a few others) to nested values."""
    scalars = st.one_of(
        st.sampled_from(words),
        st.sampled_from(words).map(Plain),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(
            ["~", "0x1F", "1e3", ".inf", "0o17", "yes", "-", "''", "!!binary aGk="]
        ).map(Plain),
    )
    tag_names = st.sampled_from(tags)
    names = st.sampled_from(["a", "b"])
    key = st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=8), st.integers(0, 9))

    def extend(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        return st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(key, children, max_size=4),
            st.builds(Tagged, tag_names, st.one_of(st.none(), children)),
            st.builds(Anchor, names, children),
            st.builds(Alias, names),
        )

    values = st.recursive(scalars, extend, max_leaves=max_leaves)
    top = st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))
    return st.one_of(top.map(emit_document), values.map(emit_document))


#: Edits that tend to break YAML in interesting places.
_SPICE = [
    "\n",
    " ",
    ":",
    "-",
    "[",
    "]",
    "{",
    "}",
    "!",
    "&a",
    "*a",
    "'",
    '"',
    "#",
    "\t",
    "\0",
    "\ufeff",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[str]) -> str:
    """A valid document with a few characters inserted, deleted or replaced."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(st.sampled_from(_SPICE), st.text(max_size=3)))
        if edit == "insert":
            text = text[:pos] + piece + text[pos:]
        elif edit == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 5)) :]
        else:
            text = text[:pos] + piece + text[pos + len(piece) :]
    return text
