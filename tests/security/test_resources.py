"""Exhausting resources: processes, memory, fds, and a flood of log output.

The bombs are bounded (a fixed number of forks, address space that is
reserved but never touched) so that a hole shows as a failed assertion, not
as a machine brought down.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from supervisor.errors import EXIT_CAPVISOR

from .conftest import Hostile
from .harness import attack, rss_kib

FORKS = 64


@attack(
    "fork bomb under `limits.nproc`",
    "rlimit (RLIMIT_NPROC); as root: refused (fail closed)",
)
def test_fork_bomb(hostile: Hostile) -> None:
    prog = hostile.c(
        "fork_bomb",
        """
        int main(int argc, char **argv) {
            int max = atoi(argv[1]), n = 0, err = 0;
            pid_t kids[256];
            for (; n < max; n++) {
                pid_t p = fork();
                if (p == 0) { pause(); _exit(0); }
                if (p < 0) { err = errno; break; }
                kids[n] = p;
            }
            printf("forked %s\\n", n < max ? "some" : "all");
            printf("error %s\\n", err ? strerrorname_np(err) : "none");
            for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
            for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
            DONE();
        }
        """,
    )
    if os.getuid() == 0 and hostile.capvisor.user.uid is None:
        # Linux exempts uid 0 from RLIMIT_NPROC: the limit cannot bind, so
        # capvisor refuses to start the program instead of pretending.
        out = hostile.run(prog, str(FORKS), extra="limits: {nproc: 16}\n", code=EXIT_CAPVISOR)
        assert out.log == b"", "the program must not have run"
        assert re.search(
            r"prog\.yaml:3:1: limits\.nproc does not bind a program running as root",
            out.supervisor_stderr,
        ), out.supervisor_stderr
        return
    out = hostile.run(prog, str(FORKS), extra="limits: {nproc: 16}\n")
    assert out.lines[-1] == "done"
    assert out.lines[:2] == ["forked some", "error EAGAIN"], (
        f"HOLE: {FORKS} forks succeeded under limits.nproc: 16 ({out.lines})"
    )


@attack("memory bomb under `limits.as`", "rlimit (RLIMIT_AS)")
def test_memory_bomb(hostile: Hostile) -> None:
    prog = hostile.c(
        "memory_bomb",
        """
        int main(void) {
            size_t chunk = 64 << 20, total = 0;
            for (int i = 0; i < 64; i++) {                 /* at most 4 GiB, never touched */
                void *p = mmap(NULL, chunk, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
                if (p == MAP_FAILED) {
                    printf("mmap %s\\n", strerrorname_np(errno));
                    break;
                }
                total += chunk;
            }
            printf("mapped %zu MiB\\n", total >> 20);
            void *big = malloc(1UL << 30);
            printf("malloc-1g %s\\n", big ? "ok" : "failed");
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra="limits: {as: 512M}\n")
    assert out.lines[0] == "mmap ENOMEM"
    mapped = int(re.fullmatch(r"mapped (\d+) MiB", out.lines[1])[1])  # type: ignore[index]
    assert mapped < 512
    assert out.lines[2:] == ["malloc-1g failed", "done"]


@attack("fd exhaustion under `limits.nofile`", "rlimit (RLIMIT_NOFILE)")
def test_fd_exhaustion(hostile: Hostile) -> None:
    prog = hostile.c(
        "fd_bomb",
        """
        int main(void) {
            int n = 0, err = 0;
            for (; n < 100000; n++)
                if (dup(1) < 0) { err = errno; break; }
            printf("error %s\\n", strerrorname_np(err));
            printf("opened %s\\n", n < 64 ? "fewer than the limit" : "too many");
            int p[2];
            TRY("pipe", pipe(p));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra="limits: {nofile: 64}\n")
    assert out.lines == ["error EMFILE", "opened fewer than the limit", "pipe EMFILE", "done"]


@dataclass
class _Peak:
    """Polls a process's resident set size until told to stop."""

    pid: int
    samples: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    #: How many samples were taken before the first log byte arrived.
    started: int | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (FileNotFoundError, ProcessLookupError, TypeError):
                return
            time.sleep(0.02)


FLOOD = """
int main(int argc, char **argv) {
    long mib = atol(argv[1]);
    static char block[1 << 20];
    /* Half the flood as 1 KiB lines, half as one line with no end at all. */
    for (size_t i = 0; i < sizeof block; i++) block[i] = (i % 1024 == 1023) ? '\\n' : 'x';
    for (long i = 0; i < mib / 2; i++) write(1, block, sizeof block);
    memset(block, 'y', sizeof block);
    for (long i = mib / 2; i < mib; i++) write(1, block, sizeof block);
    write(1, "\\nend of flood\\n", 14);
    return 0;
}
"""


def flood(hostile: Hostile, mib: int) -> tuple[int, _Peak, bytes]:
    """Run the flood; return the log's size, the supervisor's RSS samples, the log's tail."""
    prog = hostile.c("flood", FLOOD)
    desc = hostile.capvisor.describe(f"program: {prog}\nargs: ['{mib}']\n")
    proc = hostile.capvisor.popen(desc, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = _Peak(proc.pid)
    poller = threading.Thread(target=peak.run)
    poller.start()
    size, tail = 0, b""
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(1 << 20):
            if peak.started is None:
                peak.started = len(peak.samples)
            size += len(chunk)
            tail = (tail + chunk)[-4096:]
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, stderr
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    finally:
        peak.stop.set()
        poller.join()
        proc.kill()
        proc.wait()
    return size, peak, tail


#: How much the supervisor's resident memory may grow while it pumps a flood.
#: Measured: a few MiB (64 KiB reads, lines cut at 16 KiB); the bound leaves room.
RSS_GROWTH_KIB = 16 * 1024


def _check_flood(hostile: Hostile, mib: int) -> None:
    size, peak, tail = flood(hostile, mib)
    assert size > mib << 20  # every byte arrived, plus the record prefixes
    assert tail.endswith(b" stdout F end of flood\n")
    # The baseline: the supervisor started, imported everything and spawned.
    assert peak.started, "no memory sample before the first log byte"
    baseline = max(peak.samples[: peak.started])
    flooding = peak.samples[peak.started :]
    assert len(flooding) >= 10, "the flood was too short to sample"
    growth = max(flooding) - baseline
    print(f"supervisor RSS: {baseline} KiB at start, {max(flooding)} KiB at most while flooded")
    assert growth < RSS_GROWTH_KIB, f"supervisor RSS grew by {growth} KiB from {baseline} KiB"


@attack("gigabytes written to the log", "bounded pump (fixed-size reads, long lines cut)")
def test_log_flood(hostile: Hostile) -> None:
    _check_flood(hostile, 1024)


@pytest.mark.slow
def test_log_flood_long(hostile: Hostile) -> None:
    """The long variant: 8 GiB."""
    _check_flood(hostile, 8192)
