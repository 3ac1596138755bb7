"""Scale: N `sleep` programs under one `capvisor up`, against N plain children.

Run: .venv/bin/python bench/scale.py [--programs 1000] [--rounds 3] [--idle 30]

Each round, interleaved:

- baseline   this process starts N `/bin/sleep` children with os.posix_spawn,
             then SIGTERMs them all and reaps them: the floor for start and stop;
- capvisor   `capvisor up` on a set file of N confined `sleep` programs, timed
             from launch until it reports every program started (the same
             supervisor with 1 program is timed too, and its time taken off
             as Python's start-up), then `capvisor down` (stop signal to each
             program's whole tree, wait, close the logs) until it exits.

RSS per program is (RSS with N programs - RSS with 1 program) / (N - 1),
both read from /proc/PID/status after the start. Idle CPU is the supervisor's
utime+stime over ``--idle`` seconds with N programs sleeping, as a share of one
core (measured in the first round only). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLEEP = "/bin/sleep"
CAPVISOR = [sys.executable, "-m", "supervisor"]
TICKS = os.sysconf("SC_CLK_TCK")


def set_file(directory: Path, programs: int) -> Path:
    lines = ["programs:"]
    lines += [f"  p{i}: {{program: {SLEEP}, args: ['100000']}}" for i in range(programs)]
    path = directory / "capvisor.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def baseline(programs: int) -> tuple[float, float]:
    began = time.perf_counter()
    pids = [os.posix_spawn(SLEEP, [SLEEP, "100000"], {}) for _ in range(programs)]
    started = time.perf_counter() - began
    began = time.perf_counter()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)
    return started, time.perf_counter() - began


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Run:
    """One `capvisor up` of ``programs`` sleeps: its start time, RSS, stop time."""

    def __init__(self, programs: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="capvisor-scale-"))
        self.file = set_file(self.dir, programs)
        self.err = self.dir / "up.err"
        began = time.perf_counter()
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*CAPVISOR, "up", str(self.file)], stderr=err, stdout=subprocess.DEVNULL
            )
        while "control socket" not in self.err.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"capvisor up failed:\n{self.err.read_text()}")
            time.sleep(0.01)
        self.start_time = time.perf_counter() - began
        said = self.err.read_text()
        if f"{programs} of {programs} programs started" not in said:
            self.down()  # never leave a supervisor behind
            raise RuntimeError(f"not every program started:\n{said[-2000:]}")
        time.sleep(1.0)  # let the pumps and waiters settle
        self.rss = rss_kib(self.proc.pid)

    def idle_cpu(self, seconds: float) -> float:
        before = cpu_seconds(self.proc.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.proc.pid) - before) / seconds

    def down(self) -> float:
        began = time.perf_counter()
        subprocess.run([*CAPVISOR, "down", "-f", str(self.file)], check=True)
        self.proc.wait()
        took = time.perf_counter() - began
        shutil.rmtree(self.dir, ignore_errors=True)
        return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    args = parser.parse_args()
    n = args.programs
    rows: dict[str, list[float]] = {
        k: [] for k in ("base_start", "base_stop", "one_start", "start", "stop", "rss_per", "cpu")
    }
    for round_ in range(args.rounds):
        start, stop = baseline(n)
        rows["base_start"].append(start)
        rows["base_stop"].append(stop)
        one = Run(1)
        rows["one_start"].append(one.start_time)
        one_rss = one.rss
        one.down()
        many = Run(n)
        rows["start"].append(many.start_time - one.start_time)
        rows["rss_per"].append((many.rss - one_rss) / (n - 1))
        if round_ == 0 and args.idle > 0:
            rows["cpu"].append(many.idle_cpu(args.idle))
        rows["stop"].append(many.down())
        print(
            f"round {round_ + 1}: start {rows['start'][-1]:.2f}s (baseline"
            f" {start:.2f}s), stop {rows['stop'][-1]:.2f}s (baseline {stop:.2f}s),"
            f" RSS {many.rss} KiB with {n} vs {one_rss} KiB with 1",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print(f"\n{n} programs, medians of {args.rounds} rounds")
    print(f"{'what':38} {'capvisor':>10} {'baseline':>10} {'ratio':>7}")
    print(
        f"{'start all (s)':38} {med['start']:10.2f} {med['base_start']:10.2f}"
        f" {med['start'] / med['base_start']:7.1f}"
    )
    print(
        f"{'stop all (s)':38} {med['stop']:10.2f} {med['base_stop']:10.2f}"
        f" {med['stop'] / med['base_stop']:7.1f}"
    )
    print(f"{'start per program (ms)':38} {med['start'] / n * 1000:10.2f}")
    print(f"{'supervisor start-up, 1 program (s)':38} {med['one_start']:10.2f}")
    print(f"{'RSS per program over 1 program (KiB)':38} {med['rss_per']:10.1f}  target <= 100")
    if "cpu" in med:
        print(
            f"{'idle CPU over ' + format(args.idle, 'g') + ' s (% of a core)':38}"
            f" {med['cpu'] * 100:10.2f}  target <= 1"
        )


if __name__ == "__main__":
    main()
