"""Reading CRI logs back: the joiner, tail, since, follow, and `capvisor logs`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logfile import LogFile
from supervisor.logread import (
    Joiner,
    Line,
    Malformed,
    locate,
    parse_timestamp,
    read_lines,
    tail_lines,
)
from supervisor.logs import Framer

from .cri_log import stream_bytes

PYTHON = sys.executable
T0 = 1_795_431_311_000_000_000  # 2026-11-23T10:55:11Z


def logs(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "supervisor", "logs", *args], capture_output=True, timeout=timeout, cwd=cwd
    )


def frame(pieces: list[tuple[str, bytes, int]], max_line: int = 16384) -> bytes:
    """Records for (stream, bytes, ns) pieces, each stream with its own framer."""
    framers = {s: Framer(s, max_line) for s in ("stdout", "stderr")}
    out = b"".join(framers[s].feed(data, ns) for s, data, ns in pieces)
    return out + b"".join(f.finish(T0 + 10**12) for f in framers.values())


def test_timestamps_of_any_rfc3339_precision_and_offset() -> None:
    assert parse_timestamp(b"2026-11-23T10:55:11.123456789Z") == T0 + 123456789
    assert parse_timestamp("2026-11-23T10:55:11Z") == T0
    assert parse_timestamp("2026-11-23T10:55:11.5Z") == T0 + 500_000_000
    assert parse_timestamp("2026-11-23T11:55:11.000000001+01:00") == T0 + 1
    assert parse_timestamp("2026-11-23T10:55:11") is None
    assert parse_timestamp("2026-13-23T10:55:11Z") is None


def test_kubelet_file_partial_lines_joined(tmp_path: Path) -> None:
    """Records as kubelet/containerd write them (trimmed fractions, offsets)."""
    path = tmp_path / "0.log"
    path.write_bytes(
        b"2016-10-06T00:17:09.669794202Z stdout P log content 1\n"
        b"2016-10-06T00:17:09.669794203Z stderr F err\n"
        b"2016-10-06T00:17:09.6697942Z stdout F  and 2\n"
        b"2016-10-06T02:17:10+02:00 stdout F \n"
    )
    lines = list(read_lines(path, Joiner(str(path))))
    assert lines == [
        Line(b"2016-10-06T00:17:09.669794203Z", "stderr", b"err\n"),
        Line(b"2016-10-06T00:17:09.669794202Z", "stdout", b"log content 1 and 2\n"),
        Line(b"2016-10-06T02:17:10+02:00", "stdout", b"\n"),
    ]


def test_malformed_lines_are_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    good = frame([("stdout", b"one\n", T0)])
    path.write_bytes(good + b"garbage\n" + good + b"2026-11-23T10:55:11Z stdout X x\n" + good)
    items = list(read_lines(path, Joiner(str(path))))
    assert [str(i) for i in items if isinstance(i, Malformed)] == [
        f"{path}:2:1: not a CRI log record: b'garbage'",
        f"{path}:4:1: not a CRI log record: b'2026-11-23T10:55:11Z stdout X x'",
    ]
    assert [i.content for i in items if isinstance(i, Line)] == [b"one\n"] * 3
    done = logs(str(path))
    assert done.returncode == 1
    assert done.stdout == b"one\n" * 3
    assert f"capvisor: {path}:2:1: not a CRI log record" in done.stderr.decode()


pieces_strategy = st.lists(
    st.tuples(
        st.sampled_from(["stdout", "stderr"]),
        st.binary(max_size=60).map(lambda b: b.replace(b"\x01", b"\n")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(pieces=pieces_strategy, count=st.integers(0, 30), window=st.integers(8, 200))
def test_tail_equals_the_end_of_the_whole(
    tmp_path_factory: pytest.TempPathFactory,
    pieces: list[tuple[str, bytes]],
    count: int,
    window: int,
) -> None:
    path = tmp_path_factory.mktemp("tail") / "t.log"
    path.write_bytes(frame([(s, d, T0 + i) for i, (s, d) in enumerate(pieces)], max_line=7))
    whole = [i for i in read_lines(path, Joiner(str(path))) if isinstance(i, Line)]
    tail, end = tail_lines(path, Joiner(str(path)), count, window=window)
    assert tail == (whole[-count:] if count else [])
    assert end == path.stat().st_size


def test_round_trip_of_a_pumped_file(tmp_path: Path) -> None:
    """What `capvisor logs` prints is exactly what the program wrote, per stream."""
    out = b"a" * 40000 + b"\n\xff\x00\r\nbin\rary\n" + b"".join(b"%d\n" % i for i in range(5000))
    err = b"".join(b"e%d\n" % i for i in range(300)) + b"tail without newline"
    pieces = [("stdout", out[i : i + 4096], T0 + i) for i in range(0, len(out), 4096)]
    pieces += [("stderr", err, T0)]
    path = tmp_path / "app.log"
    path.write_bytes(frame(pieces))
    done = logs(str(path))
    assert done.returncode == 0
    assert (done.stdout, done.stderr) == (out, err)
    assert stream_bytes(path.read_bytes(), "stdout") == out
    only = logs("--stream", "stderr", "--tail", "2", str(path))
    assert (only.stdout, only.stderr) == (b"", b"e299\ntail without newline")
    last = logs("--tail", "3", "--stream", "stdout", "--timestamps", str(path))
    stamps = [line.split(b" ")[0] for line in last.stdout.splitlines()]
    assert [line.split(b" ")[1] for line in last.stdout.splitlines()] == [b"4997", b"4998", b"4999"]
    assert all(parse_timestamp(s) is not None for s in stamps)


def test_since(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(
        frame([("stdout", b"old\n", T0), ("stdout", b"new\n", T0 + 10**9)])
        + frame([("stdout", b"recent\n", time.time_ns())])
    )
    assert logs("--since", "2026-11-23T10:55:12Z", str(path)).stdout == b"new\nrecent\n"
    assert logs("--since", "2026-11-23T11:55:11.5+01:00", str(path)).stdout == b"new\nrecent\n"
    assert logs("--since", "1h", str(path)).stdout == b"recent\n"
    bad = logs("--since", "yesterday", str(path))
    assert bad.returncode == 2 and b"not an RFC 3339 time" in bad.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    done = logs(str(tmp_path / "nope.log"))
    assert done.returncode == 125
    assert done.stderr.decode() == f"capvisor: {tmp_path / 'nope.log'}: No such file or directory\n"


def test_names_map_to_files_through_a_lookup(tmp_path: Path) -> None:
    known = {"web": tmp_path / "web.log"}
    assert locate("web", known.get) == tmp_path / "web.log"
    assert locate(str(tmp_path / "x.log"), known.get) == tmp_path / "x.log"
    assert locate("other", known.get) == Path("other")


def test_follow_across_rotation(tmp_path: Path) -> None:
    """-f keeps printing while the writer rotates the file under it: every line once."""
    path = tmp_path / "app.log"
    log = LogFile(path, max_size=4096, max_files=1000)
    framer = Framer("stdout")
    log.write(framer.feed(b"before\n"))
    follower = subprocess.Popen(
        [PYTHON, "-m", "supervisor", "logs", "-f", "--tail", "1", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"before\n"
        expected = b"".join(b"%06d\n" % i for i in range(5000))
        for i in range(0, len(expected), 700):
            log.write(framer.feed(expected[i : i + 700]))
            time.sleep(0.002)
        assert len(log.rotated_files()) > 10
        got = b""
        deadline = time.monotonic() + 30
        os.set_blocking(follower.stdout.fileno(), False)
        while len(got) < len(expected) and time.monotonic() < deadline:
            got += follower.stdout.read() or b""
            time.sleep(0.05)
        assert got == expected
    finally:
        follower.terminate()
        follower.wait(10)
        log.close()


def test_follow_through_a_cut_torn_record_and_a_truncation(tmp_path: Path) -> None:
    """-f: a torn record cut off by the writer (full disk) is printed once, whole;
    a file truncated to nothing is read again from its start."""
    path = tmp_path / "app.log"
    framer = Framer("stdout")
    first = framer.feed(b"one\n", T0)
    path.write_bytes(first)
    follower = subprocess.Popen(
        [PYTHON, "-m", "supervisor", "logs", "-f", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"one\n"
        record = framer.feed(b"two\n", T0)
        with open(path, "ab") as f:
            f.write(record[:20])  # what a write cut short by ENOSPC leaves
            f.flush()
            time.sleep(0.5)
            f.truncate(len(first))  # LogFile cuts the torn part off
        time.sleep(0.5)  # the follower sees the cut before the record comes again
        with open(path, "ab") as f:
            f.write(record)
        assert follower.stdout.readline() == b"two\n"
        time.sleep(0.5)
        path.write_bytes(framer.feed(b"three\n", T0))  # truncated and rewritten
        assert follower.stdout.readline() == b"three\n"
    finally:
        follower.terminate()
        rest, errors = follower.communicate(timeout=10)
    assert (rest, errors) == (b"", b"")
