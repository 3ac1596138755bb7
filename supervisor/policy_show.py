"""The expanded table of a policy, and the difference of two; pure functions.

``capvisor policy show`` prints :func:`table` rendered by :func:`render`;
``capvisor policy diff`` prints :func:`diff`. A :class:`Row` is one rule in
force: syscall, action, conditions (``-`` for none) and where it came from
(section, groups, file:line:column). The last row, ``*``, is the default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .policy import Origin, Policy, Rule

__all__ = ["Row", "diff", "render", "table"]


@dataclass(frozen=True, order=True)
class Row:
    """One line of ``policy show``. ``key`` (syscall, action, conditions) is
    what the filter does; ``origin`` why."""

    syscall: str
    action: str
    conditions: str
    origin: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.syscall, self.action, self.conditions)


def _origin(origin: Origin) -> str:
    text: str = origin.section
    if origin.via:
        text += " " + " > ".join(origin.via)
    if origin.location is not None:
        where = origin.location
        text += f" ({Path(where.file).name}:{where.line}:{where.column})"
    return text


def _conditions(rule: Rule) -> str:
    return " and ".join(str(c) for c in rule.checks) or "-"


def table(policy: Policy, *, overridden: bool = False) -> list[Row]:
    """The rules in force, by syscall, then the default (syscall ``*``).

    With ``overridden``, also the entries another one beat, their action
    shown as ``(allow)`` or ``(EPERM)`` in parentheses.
    """
    rows = [Row(r.syscall, str(r.action), _conditions(r), _origin(r.origin)) for r in policy.rules]
    if overridden:
        rows += [
            Row(r.syscall, f"({r.action})", _conditions(r), _origin(r.origin) + ", overridden")
            for r in policy.overridden
        ]
    rows.sort()
    rows.append(Row("*", str(policy.default), "-", "default"))
    return rows


def render(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table with a header line."""
    header = Row("SYSCALL", "ACTION", "CONDITIONS", "FROM")
    every = [header, *rows]
    widths = [max(len(getattr(r, f)) for r in every) for f in ("syscall", "action", "conditions")]
    lines = []
    for r in every:
        cells = (r.syscall, r.action, r.conditions)
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + r.origin
        )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _by_syscall(rows: Iterable[Row]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for row in rows:
        out.setdefault(row.syscall, set()).add((row.action, row.conditions))
    return out


def diff(a: Sequence[Row], b: Sequence[Row]) -> list[str]:
    """What changes from ``a`` to ``b``, one line per syscall that differs.

    ``+ name: action [if conditions]`` a rule only in ``b``, ``- ...`` only in
    ``a``; a syscall with rules in both but different ones shows both. Rows
    equal in action and conditions are the same whatever their origin.
    """
    left, right = _by_syscall(a), _by_syscall(b)
    lines = []
    for name in sorted(set(left) | set(right), key=lambda n: (n == "*", n)):
        old, new = left.get(name, set()), right.get(name, set())
        for sign, items in (("-", old - new), ("+", new - old)):
            for action, conditions in sorted(items):
                where = "" if conditions == "-" else f" if {conditions}"
                lines.append(f"{sign} {name}: {action}{where}")
    return lines
