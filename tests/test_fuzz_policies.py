"""Fuzzing seccomp policies: random YAML through the loader and the compiler.

The property, for every example: a compiled filter or a clear error (a
:class:`PolicyError` whose problems name FILE:LINE:COL, or the policy that
could not be found), never another exception, a hang or a leaked fd. Budget:
see test_fuzz_descriptions.py and docs/security.md.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from supervisor.errors import PolicyError
from supervisor.policy import compile_policy, load_policy
from supervisor.syscall_groups import CONSTANTS, GROUPS

from .security.harness import Snapshot, fuzz_budget, time_limit
from .security.yamlgen import documents, mutated

KEYS = ["version", "include", "default", "allow", "deny", "errno", "allow_if"]
SYSCALLS = ["read", "write", "openat", "clone", "clone3", "ioctl", "prctl", "socket", "ptrace"]
WORDS = [
    *KEYS,
    *SYSCALLS,
    *list(GROUPS)[:8],
    "@nonexistent",
    "readd",
    "socketcall",  # a syscall on other architectures only
    *list(CONSTANTS)[:12],
    "arg0",
    "arg1",
    "arg6",
    "any_of",
    "none_of_mask",
    "eq",
    "mask",
    "nonneg_fd",
    "EPERM",
    "ENOSYS",
    "EBOGUS",
    "kill",
    "log",
    "allow",
    "default",
    "other.yaml",
    "self.yaml",
    "missing.yaml",
    "../x",
]
TAGS = ["!!str", "!!int", "!!map", "!foo", "tag:capvisor.dev,2026:mount"]

SEEDS = [
    (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text(),
    "version: 1\ninclude: [other.yaml]\ndefault: kill\nallow: [read, '@basic-io']\n"
    "deny: [write]\nerrno: {clone3: ENOSYS}\n"
    "allow_if:\n  ioctl:\n    arg1: {any_of: [TCGETS, 0x5401]}\n"
    "  prctl: [{arg0: {eq: 15}}, {arg0: {eq: 16, mask: 0xff}}]\n",
]


@pytest.fixture(scope="module")
def policy_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="capvisor-fuzz-policy-"))
    (path / "other.yaml").write_text("version: 1\nallow: [read]\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def check_policy_text(directory: Path, text: str) -> None:
    path = directory / "self.yaml"
    path.write_text(text, errors="surrogateescape")
    try:
        with time_limit(20):
            compiled = compile_policy(load_policy(str(path)))
        assert compiled.instructions > 0
        event("compiled")
    except PolicyError as exc:
        event("refused")
        assert exc.problems
        for problem in exc.problems:
            if problem.location is None:  # only "cannot find or read this policy file"
                assert "not found" in problem.message or "not UTF-8" in problem.message, problem
                continue
            assert problem.location.line >= 1 and problem.location.column >= 1, problem
            assert Path(problem.location.file).name in ("self.yaml", "other.yaml"), problem


FUZZ = settings(
    max_examples=fuzz_budget(200),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(text=documents(KEYS, WORDS, TAGS))
def test_random_policies(policy_dir: Path, text: str) -> None:
    before = Snapshot.take()
    check_policy_text(policy_dir, text)
    assert before.leaks(Snapshot.take()) == []


@st.composite
def plausible(draw: st.DrawFn) -> str:
    """Policies of the right shape with random names, errnos and conditions."""
    names = st.one_of(st.sampled_from(SYSCALLS), st.sampled_from(list(GROUPS)), st.text(max_size=6))
    const = st.one_of(
        st.sampled_from(list(CONSTANTS)),
        st.integers(-(1 << 33), 1 << 33).map(str),
        st.sampled_from(["0x5401", "-100", "true", "null", "BOGUS"]),
    )
    lines = ["version: " + draw(st.sampled_from(["1", "2", "'1'", "true"]))]
    if draw(st.booleans()):
        lines.append(
            "default: " + draw(st.sampled_from(["kill", "log", "EPERM", "allow", "7", "x"]))
        )
    if draw(st.booleans()):
        lines.append(f"include: [{draw(st.sampled_from(['other.yaml', 'self.yaml', 'missing']))}]")
    for section in ("allow", "deny"):
        if draw(st.booleans()):
            items = draw(st.lists(names, max_size=5))
            lines.append(f"{section}: [{', '.join(repr(i) for i in items)}]")
    if draw(st.booleans()):
        lines.append("errno:")
        for name in draw(st.lists(names, min_size=1, max_size=3)):
            lines.append(f"  {name!r}: {draw(st.sampled_from(['ENOSYS', 'EPERM', '0', 'E']))}")
    if draw(st.booleans()):
        lines.append("allow_if:")
        for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
            arg = draw(st.sampled_from(["arg0", "arg1", "arg5", "arg6"]))
            kind = draw(st.sampled_from(["any_of", "none_of_mask", "eq"]))
            if kind == "eq":
                cond = f"{{eq: {draw(const)}" + (
                    f", mask: {draw(const)}}}" if draw(st.booleans()) else "}"
                )
            else:
                cond = f"{{{kind}: [{', '.join(draw(st.lists(const, max_size=3)))}]}}"
            lines.append(f"  {name!r}: {{{arg}: {cond}}}")
    return "\n".join(lines) + "\n"


@settings(FUZZ, max_examples=fuzz_budget(200))
@given(text=st.one_of(plausible(), mutated(SEEDS)))
def test_plausible_policies(policy_dir: Path, text: str) -> None:
    before = Snapshot.take()
    check_policy_text(policy_dir, text)
    assert before.leaks(Snapshot.take()) == []
