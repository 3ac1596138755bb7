"""Fuzzing program descriptions: random YAML through the reader, the resolver and `check`.

The property, for every example: a description or a clear error (every
problem located at FILE:LINE:COL), never another exception, a hang, a leaked
fd or a child left behind. CI runs a bounded number of examples; set
``CAPVISOR_FUZZ_EXAMPLES`` for a longer run (docs/security.md).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from supervisor.description import LIMITS, TOP_LEVEL_KEYS, Description, parse_description
from supervisor.errors import CapvisorError, DescriptionError
from supervisor.process import run_plan
from supervisor.resolve import resolve
from supervisor.tags import CLOUDABI_PREFIX, KNOWN_TAGS, LONG_PREFIX

from .conftest import PYTHON
from .security.harness import Snapshot, fuzz_budget, time_limit
from .security.yamlgen import documents, mutated

FILENAME = "fuzz.yaml"

TAGS = [
    *KNOWN_TAGS,
    *(LONG_PREFIX + t[1:] for t in KNOWN_TAGS),
    *(CLOUDABI_PREFIX + n for n in ("fd", "file", "socket", "executable", "bogus")),
    "!mnt",
    "!",
    "!!str",
    "!!map",
    "!!seq",
    "!!int",
    "tag:yaml.org,2002:binary",
    "tag:example.com,2000:other",
]
KEYS = [
    *TOP_LEVEL_KEYS,
    *LIMITS,
    "path",
    "mode",
    "create",
    "bind",
    "connect",
    "type",
    "backlog",
    "signal",
    "timeout",
    "policy",
    "backoff",
    "labels",
]
WORDS = [
    "/bin/true",
    "/nonexistent",
    "stdout",
    "stderr",
    "stdin",
    "ro",
    "rw",
    "r",
    "w",
    "a",
    "tcp:127.0.0.1:0",
    "udp:[::1]:0",
    "tcp:999.1.1.1:1",
    "unix:@x",
    "unix:/tmp/x.sock",
    "unix:",
    "1G",
    "10s",
    "1.5m",
    "-1",
    "TERM",
    "SIGKILL",
    "on-failure",
    "1s..60s",
    "60s..1s",
    "deny",
    "allow",
    "default",
    ".",
    "..",
    "",
    "x" * 300,
]

SEEDS = [
    "program: /bin/true\n",
    "program: /bin/sh\nargs: [-c, 'cat <&3', !file {path: f.txt}]\n"
    "env: {A: b, FD: !mount {path: ., mode: ro}}\n",
    "program: /bin/true\nfds:\n  a: !file {path: x, mode: w, create: true}\n"
    "  b: !socket {bind: 'tcp:127.0.0.1:0', backlog: 5}\n  c: !executable\n  d: &d !log stdout\n"
    "  e: *d\nlimits: {nofile: 64, as: 1G, cpu: 1m}\nstop: {signal: TERM, timeout: 2s}\n"
    "restart: {policy: on-failure, backoff: 1s..60s}\n",
    "program: /bin/true\nstdin: !fd stdin\nstdout: !log stderr\nruntime: [/bin/cat]\n"
    "degrade: allow\npolicy: default\ncwd: /\n",
]

_LOCATED = re.compile(rf"^{re.escape(FILENAME)}:\d+:\d+: \S")


def check_description_text(text: str) -> Description | None:
    """Parse ``text``; the only acceptable failure is a located DescriptionError."""
    try:
        with time_limit(10):
            return parse_description(text, FILENAME)
    except DescriptionError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.location is not None, f"problem without a location: {problem}"
            assert problem.location.file == FILENAME
            assert problem.location.line >= 1 and problem.location.column >= 1
            assert _LOCATED.match(str(problem)), str(problem)
        return None


FUZZ = settings(
    max_examples=fuzz_budget(300),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(documents(KEYS, WORDS, TAGS))
# What fuzzing found (each was an internal error or an unlocated message):
@example("\0program: /bin/true\n")  # a character YAML forbids
@example('!!int "/bin/true"\n')  # a core tag its value does not fit
@example("!!int\n")
@example('program: "/bin/\\ud800"\n')  # a lone surrogate, which no path can hold
@example('program: /bin/true\nenv: {"\\udc80": x}\n')
@example("name: &a x\nprogram: &a /bin/true\n")  # a reused anchor: a warning on stderr
def test_random_documents(text: str) -> None:
    before = Snapshot.take()
    check_description_text(text)
    assert before.leaks(Snapshot.take()) == []


@FUZZ
@given(mutated(SEEDS))
def test_mutated_descriptions(text: str) -> None:
    before = Snapshot.take()
    check_description_text(text)
    assert before.leaks(Snapshot.take()) == []


@settings(FUZZ, max_examples=fuzz_budget(100))
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    check_description_text(data.decode("utf-8", errors="surrogateescape"))


# -- through the resolver and a real spawn ----------------------------------
#
# Resolving opens what a description names, so these descriptions only name
# things inside a fresh directory (no `..`, no absolute paths but /bin/true).


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="capvisor-fuzz-"))
    (path / "sub").mkdir()
    (path / "f.txt").write_text("data")
    (path / "sub" / "g.txt").write_text("more")
    yield path
    shutil.rmtree(path, ignore_errors=True)


_REL = st.sampled_from(["f.txt", "sub", "sub/g.txt", "missing", "sub/missing/x", "new.txt", "."])


def _cap() -> st.SearchStrategy[str]:
    name = st.sampled_from([f"@capvisor-fuzz-{os.getpid()}", "/nonexistent/s.sock"])
    file = st.one_of(
        st.builds("!file {{path: {}}}".format, _REL),
        st.builds(
            "!file {{path: {}, mode: {}, create: {}}}".format,
            _REL,
            st.sampled_from(["w", "a", "rw"]),
            st.sampled_from(["true", "false"]),
        ),
    )
    mount = st.builds("!mount {{path: {}, mode: {}}}".format, _REL, st.sampled_from(["ro", "rw"]))
    sock = st.builds(
        "!socket {{{}: '{}'}}".format,
        st.sampled_from(["bind", "connect"]),
        st.one_of(
            st.sampled_from(["tcp:127.0.0.1:0", "udp:127.0.0.1:0", "tcp:127.0.0.1:1"]),
            name.map("unix:{}".format),
        ),
    )
    simple = st.sampled_from(["!log stdout", "!log stderr", "!executable", "!fd stdin", "!fd 2"])
    odd = st.sampled_from(["!fd 99", "!server {a: b}", "!mount nope", "plain"])
    return st.one_of(file, mount, sock, simple, simple, odd)


@st.composite
def runnable(draw: st.DrawFn) -> str:
    fds = draw(st.lists(_cap(), max_size=3))
    args = draw(st.lists(_cap(), max_size=2))
    lines = ["program: /bin/true", "args: [" + ", ".join(args) + "]"]
    if fds:
        lines.append("fds:")
        lines += [f"  n{i}: {cap}" for i, cap in enumerate(fds)]
    if draw(st.booleans()):
        lines.append("stdout: " + draw(_cap()))
    if draw(st.booleans()):
        lines.append(f"limits: {{nofile: {draw(st.integers(8, 64))}}}")
    return "\n".join(lines) + "\n"


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, records: bytes) -> None:
        self.data += records


@settings(FUZZ, max_examples=fuzz_budget(100))
@given(text=runnable())
def test_resolve_and_run_leak_nothing(sandbox: Path, text: str) -> None:
    for name in ("new.txt", "missing"):
        (sandbox / name).unlink(missing_ok=True)
    before = Snapshot.take()
    path = sandbox / FILENAME
    path.write_text(text)
    if check_description_text(text) is not None:
        description = parse_description(text, str(path))
        try:
            with time_limit(20):
                plan = resolve(description)
                plan.report()
                status = trio.run(functools.partial(run_plan, plan, _Sink(), stop_signals=()))
            assert status.shell_code == 0, status
            event("ran")
        except CapvisorError as exc:
            assert str(exc)  # a message for the user, never a bug
            event(f"refused: {type(exc).__name__}")
    else:
        event("invalid")
    assert before.leaks(Snapshot.take()) == []


# -- through `capvisor check` -------------------------------------------------


@settings(FUZZ, max_examples=fuzz_budget(12))
@given(text=st.one_of(documents(KEYS, WORDS, TAGS, max_leaves=10), mutated(SEEDS)))
def test_check_command(sandbox: Path, text: str) -> None:
    path = sandbox / "checked.yaml"
    path.write_text(text, errors="surrogateescape")
    proc = subprocess.run(
        [PYTHON, "-m", "supervisor", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=sandbox,
    )
    assert proc.returncode in (0, 125), proc.stderr
    assert proc.returncode != -signal.SIGKILL
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    for line in proc.stderr.splitlines():
        assert line.startswith(f"{path}:"), line
