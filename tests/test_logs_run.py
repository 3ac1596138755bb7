"""Logs of real programs run by `capvisor run`: exact bytes, rotation, SIGHUP, full disk, drain.

Every test runs the real CLI (as root and as uid 65534, see conftest) on a
real program and reads the log back with the spec parser in cri_log.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import IS_ROOT, Capvisor
from .cri_log import records, stream_bytes

PYTHON = sys.executable


def python_program(capvisor: Capvisor, script: str, extra: str = "") -> Path:
    return capvisor.describe(f"program: {PYTHON}\nargs: [-c, {json.dumps(script)}]\n{extra}")


def numbered(start: int, stop: int, width: int = 7) -> bytes:
    return b"".join(b"%0*d\n" % (width, i) for i in range(start, stop))


MIXED = """
import os, random
def put(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
put(1, b"a" * 40000 + b"\\n")
put(1, b"crlf\\r\\nbare\\rcr\\n\\x00nul\\xff\\xfe\\n")
put(1, random.Random(7).randbytes(300000))
put(1, b"\\nend")
for i in range(2000):
    put(1, b"out %d\\n" % i)
    put(2, b"err %d\\n" % i)
"""


def test_long_lines_binary_and_interleaved_streams(capvisor: Capvisor) -> None:
    result = capvisor.run(python_program(capvisor, MIXED))
    assert result.returncode == 0, result.stderr
    expected_out = (
        b"a" * 40000
        + b"\ncrlf\r\nbare\rcr\n\x00nul\xff\xfe\n"
        + random.Random(7).randbytes(300000)
        + b"\nend"
        + b"".join(b"out %d\n" % i for i in range(2000))
    )
    assert stream_bytes(result.log, "stdout") == expected_out
    assert stream_bytes(result.log, "stderr") == b"".join(b"err %d\n" % i for i in range(2000))
    recs = [r for r in records(result.log) if r.stream == "stdout"]  # streams interleave
    first = [(r.tag, len(r.content)) for r in recs[:3]]
    assert first == [("P", 16384), ("P", 16384), ("F", 40000 - 2 * 16384)]
    assert all(len(r.content) <= 16384 for r in recs)
    assert any(r.content == b"crlf\r" and r.tag == "F" for r in recs)


WRITER = """
import os, sys
total, pace = int(sys.argv[1]), float(sys.argv[2])
import time
for i in range(total):
    os.write(1, b"%07d\\n" % i)
    if i % 97 == 0:
        os.write(2, b"e%07d\\n" % i)
    if pace and i % 50 == 0:
        time.sleep(pace)
"""


def writer(capvisor: Capvisor, total: int, pace: float, extra: str = "") -> Path:
    script = WRITER.replace("int(sys.argv[1])", str(total)).replace("float(sys.argv[2])", str(pace))
    return python_program(capvisor, script, extra)


def expected_streams(total: int) -> tuple[bytes, bytes]:
    return numbered(0, total), b"".join(b"e%07d\n" % i for i in range(0, total, 97))


def test_rotation_during_continuous_writing(capvisor: Capvisor, work: Path) -> None:
    """The description's log: {path, max_size, max_files}: every line once, files bounded."""
    capvisor.user.own(work)
    desc = writer(capvisor, 60000, 0, "log: {path: app.log, max_size: 32K, max_files: 1000}\n")
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == ""
    rotated = sorted(work.glob("app.log.*"), key=rotation_key)
    assert len(rotated) > 20
    for path in [*rotated, work / "app.log"]:
        data = path.read_bytes()
        assert len(data) <= 32 * 1024
        records(data)  # whole records in every file
    log = b"".join(p.read_bytes() for p in [*rotated, work / "app.log"])
    out, err = expected_streams(60000)
    assert stream_bytes(log, "stdout") == out
    assert stream_bytes(log, "stderr") == err


def rotation_key(path: Path) -> tuple[str, int]:
    stamp, _, n = path.name.removeprefix("app.log.").partition(".")
    return stamp, int(n or 0)


UNTIL_STDIN_CLOSES = """
import os, select
i = 0
while not select.select([0], [], [], 0.01)[0]:
    for _ in range(20):
        os.write(1, b"%07d\\n" % i)
        if i % 97 == 0:
            os.write(2, b"e%07d\\n" % i)
        i += 1
"""


@pytest.mark.parametrize("how", ["sighup", "logs --reopen"])
def test_reopen_without_loss_or_duplicate(capvisor: Capvisor, work: Path, how: str) -> None:
    """mv app.log app.log.N; kill -HUP (or capvisor logs --reopen): a new app.log goes on."""
    capvisor.user.own(work)
    desc = python_program(capvisor, UNTIL_STDIN_CLOSES, "stdin: !fd stdin\n")
    proc = capvisor.popen(desc, "--log", "app.log", stdin=subprocess.PIPE)
    log = work / "app.log"
    try:
        wait_for(lambda: log.exists() and log.stat().st_size > 0)
        for n in range(1, 6):
            os.rename(log, work / f"app.log.{n}")
            if how == "sighup":
                proc.send_signal(signal.SIGHUP)
            else:
                asked = capvisor.run("app.log", "--reopen", command="logs")
                assert asked.returncode == 0, asked.stderr
                assert f"reopen app.log: {proc.pid}" in asked.stdout.decode()
            wait_for(lambda: log.exists() and log.stat().st_size > 0)
            time.sleep(0.1)
        proc.communicate(b"stop", timeout=30)
        assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()
    data = b"".join(p.read_bytes() for p in [*(work / f"app.log.{n}" for n in range(1, 6)), log])
    out = stream_bytes(data, "stdout")
    total = out.count(b"\n")
    assert total > 500
    assert out == numbered(0, total)
    assert stream_bytes(data, "stderr") == b"".join(b"e%07d\n" % i for i in range(0, total, 97))


def test_reopen_of_a_log_nobody_writes(capvisor: Capvisor, work: Path) -> None:
    (work / "idle.log").write_bytes(b"")
    result = capvisor.run("idle.log", "--reopen", command="logs")
    assert result.returncode == 125
    assert result.stderr == "capvisor: idle.log: no capvisor run process is writing this log\n"


def wait_for(condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def full_tmpfs(work: Path) -> Iterator[tuple[Path, Path]]:
    """A 24 MiB tmpfs, filled up by one file: (mount point, filler). Root only."""
    if not IS_ROOT:
        pytest.skip("mounting a tiny tmpfs to provoke ENOSPC needs root")
    mount = work / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0777", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield mount, filler
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


FULL_DISK_WRITER = """
import os
line = b"x" * 92
for i in range(100000):
    os.write(1, b"%07d%s\\n" % (i, line))
    if i % 500 == 0:
        os.pwrite(3, b"%9d" % i, 0)
os.pwrite(3, b"%9d" % 100000, 0)
"""


def test_full_disk_blocks_the_program_and_loses_nothing(
    capvisor: Capvisor, work: Path, full_tmpfs: tuple[Path, Path]
) -> None:
    """ENOSPC: an event, the program blocks on its pipe (bounded memory), writing resumes."""
    mount, filler = full_tmpfs
    progress = work / "progress"
    progress.write_bytes(b"%9d" % 0)
    capvisor.user.own(progress)
    desc = python_program(
        capvisor, FULL_DISK_WRITER, "fds:\n  progress: !file {path: progress, mode: rw}\n"
    )
    proc = capvisor.popen(
        desc, "--log", str(mount / "app.log"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # The program runs until its pipe is full, then stays blocked in write(2).
        seen: list[int] = []

        def stuck() -> bool:
            seen.append(int(progress.read_bytes()))
            return len(seen) > 50 and seen[-1] == seen[-50] > 0

        wait_for(stuck)
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        assert Path(f"/proc/{child}/wchan").read_text().endswith("pipe_write")  # anon_pipe_write
        assert seen[-1] < 40000  # at most pipe + one read batch (~2 MiB) of its 10 MB
        rss_kib = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0])
        assert rss_kib < 150_000
        assert proc.poll() is None
        filler.unlink()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr
    text = stderr.decode()
    assert text.count("No space left on device") == 1, text
    assert "writing the log to" in text and "again (after" in text and "nothing lost" in text
    assert stdout == b""
    expected = b"".join(b"%07d%s\n" % (i, b"x" * 92) for i in range(100000))
    assert stream_bytes((mount / "app.log").read_bytes(), "stdout") == expected


GRANDCHILD = """
import os, time
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()  # out of the program's process group: not killed when it exits
    os.close(ready_w)
    time.sleep(0.1)
    for i in range(3000):
        os.write(1, b"%07d\\n" % i)
        if i % 300 == 0:
            time.sleep(0.05)
    os._exit(0)
os.close(ready_w)
os.read(ready_r, 1)  # EOF once the grandchild left the group
os.write(2, b"program exits\\n")
os._exit(7)
"""


def test_drain_includes_a_grandchild_writing_after_the_program_exited(
    capvisor: Capvisor,
) -> None:
    """Within the 2 s grace, a grandchild's output after the exit is all in the log."""
    start = time.monotonic()
    result = capvisor.run(python_program(capvisor, GRANDCHILD))
    elapsed = time.monotonic() - start
    assert result.returncode == 7, result.stderr
    assert stream_bytes(result.log, "stdout") == numbered(0, 3000)
    assert stream_bytes(result.log, "stderr") == b"program exits\n"
    assert elapsed < 30


def test_bad_log_settings_are_located(capvisor: Capvisor) -> None:
    desc = capvisor.describe(
        "program: /bin/true\nlog: {path: a.log, max_size: lots, max_files: 1, keep: 3}\n"
    )
    result = capvisor.run(desc, command="check")
    assert result.returncode == 125
    assert result.stderr.splitlines() == [
        f"{desc}:2:30: log.max_size must be a size such as 10M, not 'lots'",
        f"{desc}:2:47: log.max_files must be a number of at least 2, not 1",
        f"{desc}:2:50: unknown key 'keep' in log",
    ]


def test_unwritable_log_path_names_the_description(capvisor: Capvisor, work: Path) -> None:
    desc = capvisor.describe("program: /bin/true\nlog: {path: missing/dir/app.log}\n")
    result = capvisor.run(desc)
    assert result.returncode == 125
    assert result.stderr == (
        f"capvisor: {desc}:2:1: log {work}/missing/dir/app.log: No such file or directory\n"
    )
