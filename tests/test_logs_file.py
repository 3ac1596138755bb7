"""LogFile on real files: rotation, pruning, reopen, a full disk (tiny tmpfs, as root)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor.logfile import FdSink, LogEvent, LogFile
from supervisor.logs import Framer

from .cri_log import records, stream_bytes

IS_ROOT = os.geteuid() == 0


def numbered(start: int, stop: int, width: int = 20) -> bytes:
    return b"".join(b"%0*d\n" % (width, i) for i in range(start, stop))


def batches(total: int, per_batch: int) -> Iterator[tuple[bytes, bytes]]:
    """(program bytes, records) batches of a numbered sequence."""
    framer = Framer("stdout")
    for start in range(0, total, per_batch):
        data = numbered(start, min(total, start + per_batch))
        yield data, framer.feed(data)


def send(log: FdSink, framer: Framer, data: bytes, how: str) -> None:
    """The records of ``data`` to ``log`` joined (``write``) or as buffers (``write_parts``)."""
    if how == "write":
        log.write(framer.feed(data))
    else:
        log.write_parts(framer.frame(data))


WAYS = pytest.mark.parametrize("how", ["write", "write_parts"])


def read_all(log: LogFile) -> bytes:
    return b"".join(p.read_bytes() for p in [*log.rotated_files(), Path(log.path)])


@WAYS
def test_rotation_keeps_records_whole_and_files_small(tmp_path: Path, how: str) -> None:
    events: list[LogEvent] = []
    log = LogFile(tmp_path / "app.log", max_size=4096, max_files=1000, on_event=events.append)
    written = bytearray()
    framer = Framer("stdout")
    for start in range(0, 3000, 37):
        data = numbered(start, min(3000, start + 37))
        send(log, framer, data, how)
        written += data
    log.close()
    files = [*log.rotated_files(), tmp_path / "app.log"]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        assert 0 < len(data) <= 4096
        records(data)  # each file parses on its own: no record is cut between files
    assert stream_bytes(read_all(log), "stdout") == bytes(written)
    assert [e.kind for e in events] == ["rotated"] * (len(files) - 1)
    # Rotated names: PATH.YYYYMMDD-HHMMSS, then .1, .2 within the same second.
    assert all(p.name.startswith("app.log.2") for p in files[:-1])


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "app.log", max_size=2048, max_files=3)
    everything = bytearray()
    for data, recs in batches(2000, 10):
        log.write(recs)
        everything += data
    log.close()
    assert len(log.rotated_files()) == 2
    kept = stream_bytes(read_all(log), "stdout")
    assert 0 < len(kept) < len(everything) and everything.endswith(kept)
    (tmp_path / "app.log.20000101-000000").write_bytes(b"not ours to keep\n")
    (tmp_path / "app.log.old").write_bytes(b"not a rotated name\n")
    log = LogFile(tmp_path / "app.log", max_size=64, max_files=3)
    log.write(Framer("stdout").feed(numbered(0, 10)))
    log.close()
    assert not (tmp_path / "app.log.20000101-000000").exists()
    assert (tmp_path / "app.log.old").exists()


def test_record_larger_than_max_size_gets_a_file_of_its_own(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "app.log", max_size=100, max_files=10)
    framer = Framer("stdout")
    log.write(framer.feed(b"short\n"))
    log.write(framer.feed(b"x" * 300 + b"\nafter\n"))
    log.close()
    contents = [[r.content for r in records(p.read_bytes())] for p in log.rotated_files()]
    assert contents == [[b"short"], [b"x" * 300]]
    assert [r.content for r in records((tmp_path / "app.log").read_bytes())] == [b"after"]


def test_reopen_after_rename(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "app.log")
    framer = Framer("stdout")
    log.write(framer.feed(b"one\n"))
    os.rename(tmp_path / "app.log", tmp_path / "app.log.1")
    log.write(framer.feed(b"two\n"))  # still the renamed file, as kubelet expects
    log.reopen()
    log.write(framer.feed(b"three\n"))
    log.close()
    assert stream_bytes((tmp_path / "app.log.1").read_bytes(), "stdout") == b"one\ntwo\n"
    assert stream_bytes((tmp_path / "app.log").read_bytes(), "stdout") == b"three\n"


def test_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    log = LogFile(tmp_path / "dir" / "app.log")
    os.rename(tmp_path / "dir", tmp_path / "moved")
    with pytest.raises(FileNotFoundError):
        log.reopen()
    log.write(Framer("stdout").feed(b"still here\n"))
    log.close()
    assert stream_bytes((tmp_path / "moved" / "app.log").read_bytes(), "stdout") == b"still here\n"


def test_reader_gone_is_reported_once_then_dropped() -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.close(read_fd)
    events: list[LogEvent] = []
    sink = FdSink(write_fd, on_event=events.append)
    for _ in range(3):
        sink.write(b"x\n")
    sink.close()
    assert [e.kind for e in events] == ["dropped"]
    assert sink.error is not None and sink.error.errno == errno.EPIPE
    assert "Broken pipe" in str(events[0]) and sink.pending == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for this test (root only), unmounted after."""
    if not IS_ROOT:
        pytest.skip("mounting a tiny tmpfs to provoke ENOSPC needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0777", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` with a file; return it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@WAYS
async def test_full_disk_keeps_records_and_resumes(tiny_tmpfs: Path, how: str) -> None:
    """ENOSPC mid-record: the torn record is cut off the file, kept, and written whole
    once space returns; a reopen asked for meanwhile loses and doubles nothing."""
    events: list[LogEvent] = []
    log = LogFile(tiny_tmpfs / "app.log", on_event=events.append)
    framer = Framer("stdout")
    program = numbered(0, 1000)
    send(log, framer, program[:4000], how)
    filler = fill(tiny_tmpfs)
    send(log, framer, program[4000:], how)  # more than fits: part written, the rest kept
    assert log.pending > 0
    assert [e.kind for e in events] == ["write-failed"]
    assert "No space left on device" in str(events[0])
    old = tiny_tmpfs / "app.log.1"
    os.rename(tiny_tmpfs / "app.log", old)
    records(old.read_bytes())  # whole records only: the torn one was cut off
    assert old.read_bytes().endswith(b"\n")
    log.reopen()
    with trio.move_on_after(0.3):
        await log.wait_written()  # still full: keeps retrying, cancellable
    assert log.pending > 0
    filler.unlink()
    with trio.fail_after(5):
        await log.wait_written()
    log.write(framer.feed(b"after\n"))
    log.close()
    assert [e.kind for e in events] == ["write-failed", "write-resumed"]
    new = (tiny_tmpfs / "app.log").read_bytes()
    assert stream_bytes(old.read_bytes() + new, "stdout") == program + b"after\n"
    assert len(records(new)) > 1


@WAYS
def test_disk_that_stays_full_keeps_whole_records(tiny_tmpfs: Path, how: str) -> None:
    events: list[LogEvent] = []
    log = LogFile(tiny_tmpfs / "app.log", on_event=events.append)
    framer = Framer("stdout")
    send(log, framer, numbered(0, 10), how)  # the file's page is partly used
    fill(tiny_tmpfs)
    for i in range(10, 20000, 100):  # fills that page up mid-record, then ENOSPC
        send(log, framer, numbered(i, i + 100), how)
    log.close()
    assert [e.kind for e in events] == ["write-failed", "lost"]
    assert str(events[1]).endswith("before it was closed and are lost")
    data = (tiny_tmpfs / "app.log").read_bytes()
    assert stream_bytes(data, "stdout") == numbered(0, len(records(data)))
