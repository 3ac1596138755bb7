"""The switchboard's matching core: registered servers, replica groups, balancing.

Pure (no I/O): the broker (:mod:`supervisor.switchboard`) drives it. A
*target* is one started server with its label set. Targets with identical
label sets form a *replica group*. A client's labels match a group when the
two label sets merge without a conflict. Exactly one matching group is
required; within it the replica with the least load (the broker passes
the bytes of connections a server has not taken yet) is chosen, ties broken
round robin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .switchboard_protocol import SwitchboardError, compatible, format_labels

LabelKey = frozenset[tuple[str, str]]


@dataclass(eq=False)
class Target:
    """One started server. ``endpoint`` is the broker's, opaque here."""

    labels: Mapping[str, str]
    endpoint: Any = None
    delivered: int = 0  # connections handed to it so far

    @property
    def key(self) -> LabelKey:
        return frozenset(self.labels.items())


@dataclass(eq=False)
class Group:
    """Targets with one label set; ``turn`` is the round-robin position."""

    labels: Mapping[str, str]
    replicas: list[Target] = field(default_factory=list)
    turn: int = 0

    def pick(self, load: Callable[[Target], int] = lambda target: 0) -> Target:
        """The replica with the least ``load``, round robin among equals."""
        n = len(self.replicas)
        best = self.turn % n
        if n > 1:
            order = [(self.turn + i) % n for i in range(n)]
            loads = {i: load(self.replicas[i]) for i in order}
            best = min(order, key=loads.__getitem__)
        self.turn = (best + 1) % n
        return self.replicas[best]


class Registry:
    """The set of started servers, grouped by label set."""

    def __init__(self) -> None:
        self._groups: dict[LabelKey, Group] = {}

    def add(self, target: Target) -> None:
        group = self._groups.setdefault(target.key, Group(dict(target.labels)))
        group.replicas.append(target)

    def remove(self, target: Target) -> None:
        """Forget ``target`` (idempotent); an emptied group goes too."""
        group = self._groups.get(target.key)
        if group is None or target not in group.replicas:
            return
        index = group.replicas.index(target)
        group.replicas.pop(index)
        if index < group.turn:
            group.turn -= 1
        if not group.replicas:
            del self._groups[target.key]
        elif group.turn >= len(group.replicas):
            group.turn = 0

    def matching(self, labels: Mapping[str, str]) -> list[Group]:
        """The groups whose labels merge with ``labels`` without conflict, sorted."""
        found = [g for g in self._groups.values() if compatible(g.labels, labels)]
        if len(found) < 2:
            return found  # the common case: nothing to sort
        return sorted(found, key=lambda g: sorted(g.labels.items()))

    def choose(
        self, labels: Mapping[str, str], load: Callable[[Target], int] = lambda target: 0
    ) -> Target:
        """The target a client with ``labels`` connects to (``load``: see :meth:`Group.pick`).

        Raises :class:`SwitchboardError` ``no_match`` or ``ambiguous`` (naming
        the matching label sets and the labels that tell them apart).
        """
        groups = self.matching(labels)
        if not groups:
            raise SwitchboardError("no_match", f"no matching server for {format_labels(labels)}")
        if len(groups) > 1:
            raise SwitchboardError("ambiguous", ambiguity_message(labels, groups))
        return groups[0].pick(load)

    def __len__(self) -> int:
        return sum(len(g.replicas) for g in self._groups.values())


def ambiguity_message(labels: Mapping[str, str], groups: list[Group]) -> str:
    """Names the matching servers and the labels that would tell them apart."""
    shared = set.intersection(*(set(g.labels.items()) for g in groups))
    hints = sorted(
        {f"{k}={v}" for g in groups for k, v in g.labels.items() if k not in labels}
        - {f"{k}={v}" for k, v in shared}
    )
    servers = "; ".join(format_labels(g.labels) for g in groups)
    return (
        f"ambiguous: {len(groups)} servers that are not replicas match "
        f"{format_labels(labels)} ({servers}); add one of the labels [{', '.join(hints)}]"
    )
