"""Fixtures of the escape battery: a hostile program runs under `capvisor run`.

``hostile`` builds on the suite's ``capvisor`` fixture, so every attack runs
twice: as root and as an unprivileged user (uid 65534). See harness.py for
the attack registry that docs/security.md mirrors.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import PYTHON, Capvisor
from .harness import PROBE_H, Outcome, assert_healthy


class Hostile:
    """Compiles and runs hostile programs under the default description and policy."""

    def __init__(self, capvisor: Capvisor, cc: Callable[..., Path]) -> None:
        self.capvisor = capvisor
        self.user = capvisor.user
        self.work = capvisor.work
        self._cc = cc

    @property
    def is_root(self) -> bool:
        """Whether the supervisor (and so the confined program) runs as uid 0."""
        return self.user.uid is None and self.user.name == "root"

    def c(self, name: str, body: str, *flags: str) -> Path:
        """A C program: :data:`PROBE_H` followed by ``body``."""
        return self._cc(name, PROBE_H + textwrap.dedent(body), *flags)

    def run(
        self, program: Path | str, *args: str, extra: str = "", code: int = 0, **kwargs: object
    ) -> Outcome:
        """Run ``program args`` confined, check the supervisor stayed healthy.

        ``extra`` is appended to the description (``fds:``, ``limits:`` …);
        ``code`` is the exit status the supervisor must report.
        """
        text = f"program: {program}\nargs: {json.dumps(list(args))}\n" + textwrap.dedent(extra)
        return self.run_description(text, code=code, **kwargs)

    def python(self, code: str, *, extra: str = "", status: int = 0, **kwargs: object) -> Outcome:
        """Run Python ``code`` confined (the test's interpreter; no trio in the child)."""
        return self.run(PYTHON, "-c", textwrap.dedent(code), extra=extra, code=status, **kwargs)

    def run_description(self, text: str, *, code: int = 0, **kwargs: object) -> Outcome:
        result = self.capvisor.run(self.capvisor.describe(text), **kwargs)  # type: ignore[arg-type]
        outcome = Outcome(result.returncode, result.stdout, result.stderr)
        assert_healthy(outcome, code)
        return outcome


@pytest.fixture
def hostile(capvisor: Capvisor, cc: Callable[..., Path]) -> Hostile:
    return Hostile(capvisor, cc)
