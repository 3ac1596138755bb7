"""Container CPU and memory from /proc: summed over the program's session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from supervisor.cri import stats

# A session leader whose child burns 0.3 s of CPU, then both sleep.
BURNER = """
import os, time
if os.fork() == 0:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    print("burnt", flush=True)
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


def test_usage_from_proc_counts_the_whole_session() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", BURNER], start_new_session=True, stdout=subprocess.PIPE
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"burnt\n"
        found = stats.usage(None, leader.pid)
        assert found is not None and found.source == "proc"
        assert found.cpu_ns >= 250_000_000, "the child's CPU time counts"
        alone = stats.from_proc(leader.pid)
        assert alone.rss_bytes > 2 * 4096 and found.working_set_bytes == found.rss_bytes
    finally:
        os.killpg(leader.pid, signal.SIGKILL)  # the session leader's group: both processes
        leader.wait()
    assert stats.usage(None, None) is None


def test_cgroup_without_files_falls_back_to_proc(tmp_path) -> None:
    # A directory that is not a cgroup: nothing can be read from it, /proc answers.
    leader = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
    )
    try:
        time.sleep(0.2)
        found = stats.usage(str(tmp_path), leader.pid)
        assert found is not None and found.source == "proc" and found.rss_bytes > 0
    finally:
        os.killpg(leader.pid, signal.SIGKILL)  # the session leader's group: both processes
        leader.wait()
