"""docs/security.md's table and the battery agree: every attack the battery runs
has its row there (attack and mechanism word for word), and every row that is
not marked pending names a test that exists."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from . import harness

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
_ROW = re.compile(
    r"^\| (?P<attack>[^|]+?) \| (?P<mechanism>[^|]+?) \| (?P<result>[^|]+?) \| (?P<test>[^|]+?) \|$"
)


def _load_battery() -> None:
    package = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package)]):
        if module.name.startswith("test_"):
            importlib.import_module(f"{__package__}.{module.name}")


def _rows() -> list[dict[str, str]]:
    return [m.groupdict() for line in DOC.read_text().splitlines() if (m := _ROW.match(line))]


def test_every_attack_has_its_row() -> None:
    _load_battery()
    rows = {(r["attack"], r["mechanism"]) for r in _rows()}
    missing = [
        f"| {a.name} | {a.mechanism} | … | `{test}` |"
        for test, a in sorted(harness.ATTACKS.items())
        if (a.name, a.mechanism) not in rows
    ]
    assert not missing, "docs/security.md lacks these rows:\n" + "\n".join(missing)


def test_every_row_names_a_test_or_its_issue() -> None:
    _load_battery()
    tests = {t.split("[")[0] for t in harness.ATTACKS}
    for row in _rows()[1:]:  # the first is the header
        named = re.findall(r"`(test_\w+)", row["test"])
        if "pending" in row["result"]:
            assert re.search(r"issue \d+", row["result"]), row
        else:
            assert named and all(n in tests for n in named), row
