"""Log pumping throughput: capvisor's pump against cat, s6-log and moreutils ts.

Each round feeds the same input file through ``cat FILE`` into a pipe (1 MiB,
the size capvisor asks for its log pipes) and measures the wall time until
the consumer has written everything to a file:

- ``cat``             ``cat > OUT`` — the floor: copying, no framing at all;
- ``s6-log``          ``s6-log -b -l 0 T s268435455 DIR`` — blocking mode, ISO 8601 timestamps;
- ``ts``              moreutils ``ts '%Y-%m-%dT%H:%M:%.SZ' > OUT`` (perl, per line);
- ``pump``            capvisor's :func:`supervisor.logs.pump` into a LogFile, in this
                      process (what ``capvisor run`` does for each ``!log`` pipe);
- ``capvisor run``    the whole path: description loaded, /bin/cat spawned confined
                      with the input as its stdin, its stdout pumped into a LogFile.

Inputs: (a) 64-byte lines, (b) 1 KiB lines, (c) 64 KiB blobs without newlines.
Rounds are interleaved; medians are reported: wall-clock MB/s (of input),
lines/s and the ratios to cat and s6-log, and the consumer's CPU seconds
(user + system; for pump and capvisor run, this whole process) with the same
ratios — on a shared machine the CPU figures are the steadier ones.

Install the baselines on Debian/Ubuntu with ``apt-get install s6 moreutils``;
a missing one is skipped with a note.

    .venv/bin/python bench/logs.py [--size-mib 32] [--rounds 5] [--skip-ts] [--dir DIR]
                                   [--read-size BYTES]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from supervisor import logs
from supervisor.description import load_description
from supervisor.logfile import LogFile
from supervisor.logs import pump
from supervisor.process import run_plan
from supervisor.resolve import resolve

PIPE_SIZE = 1 << 20
INPUTS = {
    "a: 64 B lines": lambda size: (b"x" * 63 + b"\n") * (size // 64),
    "b: 1 KiB lines": lambda size: (b"y" * 1023 + b"\n") * (size // 1024),
    "c: 64 KiB blobs, no newline": lambda size: b"z" * (size // 65536 * 65536),
}


def producer_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


def run_external(consumer: list[str], source: Path, out: Path | None) -> tuple[float, float]:
    """(seconds, consumer CPU seconds) for ``cat source | consumer [> out]``."""
    read_fd, write_fd = producer_pipe()
    sink = open(out, "wb") if out is not None else subprocess.DEVNULL  # noqa: SIM115
    start = time.perf_counter()
    cat = subprocess.Popen(["cat", str(source)], stdout=write_fd)
    os.close(write_fd)
    proc = subprocess.Popen(consumer, stdin=read_fd, stdout=sink)
    os.close(read_fd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cat.wait()
    elapsed = time.perf_counter() - start
    if out is not None:
        sink.close()  # type: ignore[union-attr]
    if proc.returncode:
        raise RuntimeError(f"{consumer[0]} failed with {proc.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime


def run_pump(source: Path, out: Path) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for ``cat source`` pumped by capvisor."""

    async def main() -> float:
        read_fd, write_fd = producer_pipe()
        sink = LogFile(out)
        start = time.perf_counter()
        cat = subprocess.Popen(["cat", str(source)], stdout=write_fd)
        os.close(write_fd)
        await pump(read_fd, "stdout", sink)
        await trio.to_thread.run_sync(cat.wait)
        elapsed = time.perf_counter() - start
        sink.close()
        return elapsed

    cpu = _cpu()
    elapsed = trio.run(main)
    return elapsed, _cpu() - cpu


def run_capvisor(source: Path, out: Path, work: Path) -> tuple[float, float]:
    """(seconds, CPU seconds of this process): load, resolve, spawn /bin/cat, pump."""
    desc = work / "cat.yaml"
    desc.write_text(f"program: /bin/cat\nstdin: !file {{path: {source}}}\n")

    async def main() -> float:
        start = time.perf_counter()
        plan = resolve(load_description(desc))
        sink = LogFile(out)
        await run_plan(plan, sink, stop_signals=())
        elapsed = time.perf_counter() - start
        sink.close()
        return elapsed

    cpu = _cpu()
    elapsed = trio.run(main)
    return elapsed, _cpu() - cpu


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32, help="input size (default 32 MiB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-ts", action="store_true", help="leave out moreutils ts (slow)")
    parser.add_argument(
        "--read-size",
        type=int,
        help="override supervisor.logs.READ_SIZE (most bytes per pipe read) to tune it",
    )
    parser.add_argument(
        "--dir", help="where inputs and outputs go (default: the system's temporary directory)"
    )
    args = parser.parse_args()
    size = args.size_mib << 20
    if args.read_size:
        logs.READ_SIZE = args.read_size

    variants: dict[str, Callable[[Path, Path], tuple[float, float]]] = {
        "cat": lambda src, work: run_external(["cat"], src, work / "out"),
    }
    notes = []
    if shutil.which("s6-log"):
        variants["s6-log"] = lambda src, work: run_external(
            ["s6-log", "-b", "-l", "0", "T", "s268435455", str(work / "s6")], src, None
        )
    else:
        notes.append("s6-log skipped: not installed (apt-get install s6)")
    if shutil.which("ts") and not args.skip_ts:
        variants["ts"] = lambda src, work: run_external(
            ["ts", "%Y-%m-%dT%H:%M:%.SZ"], src, work / "out"
        )
    elif not args.skip_ts:
        notes.append("ts skipped: not installed (apt-get install moreutils)")
    variants["pump"] = lambda src, work: run_pump(src, work / "out")
    variants["capvisor run"] = lambda src, work: run_capvisor(src, work / "out", work)

    print(
        f"# {args.size_mib} MiB per input, {args.rounds} rounds, medians; "
        f"{os.cpu_count()} CPUs, {os.uname().release}; "
        f"files in {args.dir or tempfile.gettempdir()}; "
        f"pump reads up to {logs.READ_SIZE} bytes at a time; "
        "load average %.2f %.2f %.2f" % os.getloadavg()
    )
    for note in notes:
        print(f"# {note}")
    with tempfile.TemporaryDirectory(prefix="capvisor-bench-logs-", dir=args.dir) as tmp:
        base = Path(tmp)
        for label, make in INPUTS.items():
            data = make(size)
            source = base / "input"
            source.write_bytes(data)
            lines = data.count(b"\n")
            times: dict[str, list[float]] = {name: [] for name in variants}
            cpus: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, variant in variants.items():
                    work = base / "work"
                    work.mkdir()
                    (work / "s6").mkdir()
                    elapsed, cpu = variant(source, work)
                    times[name].append(elapsed)
                    cpus[name].append(cpu)
                    shutil.rmtree(work)
            report(label, len(data), lines, times, cpus)
    return 0


def report(
    label: str,
    size: int,
    lines: int,
    times: dict[str, list[float]],
    cpus: dict[str, list[float]],
) -> None:
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpus.items()}
    print(f"\n## {label} ({size >> 20} MiB, {lines} lines)")
    print(
        "| consumer | MB/s | lines/s | vs cat | vs s6-log "
        "| consumer CPU s | MB per CPU s | CPU vs cat | CPU vs s6-log |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, seconds in med.items():
        mbs = size / seconds / 1e6
        per_line = f"{lines / seconds:,.0f}" if lines else "—"
        vs_s6 = f"{med['s6-log'] / seconds:.2f}" if "s6-log" in med else "—"
        cpu_s6 = f"{cpu['s6-log'] / cpu[name]:.2f}" if "s6-log" in cpu else "—"
        print(
            f"| {name} | {mbs:,.0f} | {per_line} | {med['cat'] / seconds:.2f} | {vs_s6} "
            f"| {cpu[name]:.3f} | {size / cpu[name] / 1e6:,.0f} | {cpu['cat'] / cpu[name]:.2f} "
            f"| {cpu_s6} |"
        )


if __name__ == "__main__":
    sys.exit(main())
