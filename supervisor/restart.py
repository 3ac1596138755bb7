"""Restart decisions: policy, exponential backoff with jitter, crash loops (sans-IO).

:class:`RestartTracker` is fed each exit of a program and answers what to do
next; it never sleeps or spawns, so it is tested without processes. The
service (service.py) sleeps for the delay it returns.

Backoff: the n-th restart in a row waits ``min(backoff_max, backoff_min *
2**n)`` scaled by a random factor in [0.5, 1.0] ("equal jitter"), so a
group of programs that crash together does not restart in lockstep. A run
that lasted at least ``stable`` seconds resets the count. After ``limit``
restarts in a row the program has crash-looped: the tracker says give up,
and the service marks it ``failed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from .description import RestartPolicy


@dataclass(frozen=True)
class Decision:
    """What to do after an exit: ``restart`` after ``delay`` seconds, ``done`` or ``give-up``."""

    action: Literal["restart", "done", "give-up"]
    delay: float = 0.0
    reason: str = ""


class RestartTracker:
    """Counts restarts in a row for one program and decides about the next."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.in_a_row = 0  # restarts since the last stable run
        self.total = 0
        self._rng = rng or random.Random()

    def delay(self, n: int) -> float:
        """The backoff before the ``n``-th restart in a row (from 0), with jitter."""
        base = min(self.policy.backoff_max, self.policy.backoff_min * (2 ** min(n, 62)))
        return base * self._rng.uniform(0.5, 1.0)

    def exited(self, *, failed: bool, ran_for: float) -> Decision:
        """A program that ran ``ran_for`` seconds exited (``failed``: not with code 0)."""
        kind = self.policy.policy
        if kind == "no" or (kind == "on-failure" and not failed):
            return Decision("done")
        if ran_for >= self.policy.stable:
            self.in_a_row = 0
        if self.in_a_row >= self.policy.limit:
            return Decision(
                "give-up",
                reason=(
                    f"crash loop: restarted {self.in_a_row} times in a row, "
                    f"none ran for {self.policy.stable:g}s"
                ),
            )
        wait = self.delay(self.in_a_row)
        self.in_a_row += 1
        self.total += 1
        return Decision("restart", delay=wait)

    def reset(self) -> None:
        """Forget the restarts in a row (a manual start or restart)."""
        self.in_a_row = 0
