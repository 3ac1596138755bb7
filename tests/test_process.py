"""Supervising one program in-process: waiting, stopping, draining, no leaks."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from supervisor.description import parse_description
from supervisor.errors import ResolveError, SpawnError
from supervisor.logs import FdSink
from supervisor.process import Child, ExitStatus, run_plan
from supervisor.resolve import resolve

from .cri_log import stream_bytes


class MemorySink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, records: bytes) -> None:
        self.data += records


def plan_for(text: str, directory: Path):  # type: ignore[no-untyped-def]
    path = directory / "prog.yaml"
    path.write_text(textwrap.dedent(text))
    return resolve(parse_description(path.read_text(), str(path)))


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def children() -> list[str]:
    pid = os.getpid()
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    return found


async def test_run_collects_output_and_leaks_nothing(tmp_path: Path) -> None:
    before = open_fds()
    for _ in range(20):
        sink = MemorySink()
        plan = plan_for("program: /bin/sh\nargs: [-c, 'echo hi; echo err >&2; exit 3']\n", tmp_path)
        status = await run_plan(plan, sink, stop_signals=())
        assert status == ExitStatus(code=3)
        assert stream_bytes(bytes(sink.data), "stdout") == b"hi\n"
        assert stream_bytes(bytes(sink.data), "stderr") == b"err\n"
    assert open_fds() == before
    assert children() == []


async def test_resolution_failure_closes_everything(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x")
    before = open_fds()
    with pytest.raises(ResolveError, match="nonexistent"):
        plan_for(
            """\
            program: /bin/true
            fds:
              a: !file {path: ok.txt}
              b: !socket {bind: "tcp:127.0.0.1:0"}
              c: !file {path: nonexistent.txt}
            """,
            tmp_path,
        )
    assert open_fds() == before


async def test_spawn_failure_closes_everything(tmp_path: Path) -> None:
    before = open_fds()
    plan = plan_for("program: /bin/true\ncwd: /nonexistent-dir\n", tmp_path)
    with pytest.raises(SpawnError, match="spawn failed at chdir") as info:
        await run_plan(plan, MemorySink(), stop_signals=())
    assert info.value.step == "chdir"
    assert open_fds() == before
    assert children() == []


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    plan = plan_for(
        "program: /bin/sh\nargs: [-c, 'trap \"\" TERM; echo ready; while :; do sleep 1; done']\n"
        "runtime: [/bin/sleep]\n"
        "stop: {signal: TERM, timeout: 0.5s}\n",
        tmp_path,
    )
    child = Child.spawn(plan)
    try:
        await trio.sleep(0.3)
        with trio.fail_after(10):
            status = await child.stop(plan.description.stop)
        assert status == ExitStatus(signal=signal.SIGKILL)
    finally:
        child.close()
        plan.close()


async def test_drain_waits_for_grandchild_within_grace(tmp_path: Path) -> None:
    """Output written by a grandchild before the program exits is never lost."""
    plan = plan_for(
        "program: /bin/sh\n"
        "args: [-c, '(echo from grandchild; sleep 0.2) & sleep 0.1; echo from child']\n"
        "runtime: [/bin/sleep]\n",
        tmp_path,
    )
    sink = MemorySink()
    status = await run_plan(plan, sink, stop_signals=(), drain_grace=5)
    assert status.code == 0
    assert sorted(stream_bytes(bytes(sink.data), "stdout").splitlines()) == [
        b"from child",
        b"from grandchild",
    ]


@pytest.mark.parametrize("wait", [True, False])
async def test_group_is_killed_when_program_exits(tmp_path: Path, wait: bool) -> None:
    """A background job still running when the program exits is killed with it.

    ``wait=True`` is the control: the same job, waited for, does get to speak.
    """
    script = "(sleep 0.3; echo still here) & echo started" + ("; wait" if wait else "")
    plan = plan_for(f"program: /bin/sh\nargs: [-c, '{script}']\nruntime: [/bin/sleep]\n", tmp_path)
    sink = MemorySink()
    with trio.fail_after(10):
        await run_plan(plan, sink, stop_signals=(), drain_grace=5)
    expected = b"started\nstill here\n" if wait else b"started\n"
    assert stream_bytes(bytes(sink.data), "stdout") == expected


async def test_drain_is_bounded_by_grace(tmp_path: Path) -> None:
    """A descendant that left the program's session cannot hold capvisor up."""
    script = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid(); print(os.getpid(), flush=True); time.sleep(30); os._exit(0)\n"
        "time.sleep(0.2)\n"
    )
    plan = plan_for(f"program: {sys.executable}\nargs: [-c, {json.dumps(script)}]\n", tmp_path)
    sink = MemorySink()
    start = trio.current_time()
    status = await run_plan(plan, sink, stop_signals=(), drain_grace=0.5)
    escaped = int(stream_bytes(bytes(sink.data), "stdout"))
    try:
        assert status.code == 0
        assert trio.current_time() - start < 10
    finally:
        os.kill(escaped, signal.SIGKILL)


async def test_log_file_sink(tmp_path: Path) -> None:
    plan = plan_for("program: /bin/sh\nargs: [-c, 'printf \"a\\nb\"']\n", tmp_path)
    sink = FdSink.open(str(tmp_path / "log"))
    await run_plan(plan, sink, stop_signals=())
    sink.close()
    assert stream_bytes((tmp_path / "log").read_bytes(), "stdout") == b"a\nb"
