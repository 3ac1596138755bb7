"""Restart decisions (supervisor/restart.py), without processes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.description import RestartPolicy
from supervisor.restart import RestartTracker


def tracker(policy: str = "always", **kwargs: float) -> RestartTracker:
    return RestartTracker(RestartPolicy(policy, **kwargs), rng=random.Random(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "failed", "action"),
    [
        ("no", True, "done"),
        ("no", False, "done"),
        ("on-failure", False, "done"),
        ("on-failure", True, "restart"),
        ("always", False, "restart"),
        ("always", True, "restart"),
    ],
)
def test_policy(policy: str, failed: bool, action: str) -> None:
    assert tracker(policy).exited(failed=failed, ran_for=0).action == action


def test_backoff_doubles_up_to_the_maximum_with_jitter() -> None:
    t = tracker(backoff_min=1.0, backoff_max=8.0, limit=10)
    delays = [t.exited(failed=True, ran_for=0).delay for _ in range(6)]
    for n, delay in enumerate(delays):
        base = min(8.0, 2.0**n)
        assert base / 2 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered: not in lockstep


def test_crash_loop_gives_up_after_limit_and_a_stable_run_resets() -> None:
    t = tracker(limit=3, stable=10.0, backoff_min=0.01, backoff_max=0.01)
    assert [t.exited(failed=True, ran_for=1).action for _ in range(3)] == ["restart"] * 3
    # A run of at least `stable` seconds forgives the earlier crashes.
    assert t.exited(failed=True, ran_for=10).action == "restart"
    assert [t.exited(failed=True, ran_for=1).action for _ in range(2)] == ["restart"] * 2
    decision = t.exited(failed=True, ran_for=1)
    assert decision.action == "give-up"
    assert decision.reason == "crash loop: restarted 3 times in a row, none ran for 10s"
    assert t.total == 6


def test_limit_zero_never_restarts() -> None:
    assert tracker(limit=0).exited(failed=True, ran_for=0).action == "give-up"


@given(
    low=st.floats(0.001, 100),
    factor=st.floats(1, 100),
    n=st.integers(0, 1000),
)
def test_delay_is_bounded(low: float, factor: float, n: int) -> None:
    t = RestartTracker(RestartPolicy("always", low, low * factor))
    assert low / 2 <= t.delay(n) <= low * factor
