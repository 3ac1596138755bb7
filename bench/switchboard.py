"""Switchboard cost: brokered connections against direct unix sockets.

Run: .venv/bin/python bench/switchboard.py [--rounds N] [--connects N] [--mib N] [--pin CPU]

One run starts a broker (`capvisor switchboard serve`, its own process) and
two server processes: a plain unix-socket server (the baseline) and a
switchboard server on the broker. Each round measures every variant once,
interleaved, so a noisy neighbour hits both alike; medians over the rounds
are reported with the ratio to the baseline, and the median of the
per-round ratios (robust when a noisy neighbour hits one round).

- connect latency: connect, send one byte, read the server's one-byte answer,
  close; direct = connect(2) to the unix socket the server accept(2)s on;
  brokered = client_connect through the broker (the server accepts the
  delivered connection, then answers on it). µs per connection, the median
  of a round's connections, then the median over rounds.
- connections/s: the same operation from 4 client processes at once,
  --connects each.
- bulk throughput: a child forked by the bench sends --mib MiB in 64 KiB
  chunks to the bench; over a plain socketpair vs over a brokered connection
  (the child starts a server, the bench connects). MiB/s from the first byte
  to EOF, so connection setup is not part of it.
- the broker's CPU time per brokered connection, from /proc (10 ms ticks,
  so only meaningful over a whole round).
- a floor reference: the same brokered connect through ``relay_floor.c``, a
  C relay that does only what any broker must (a socketpair, one end to the
  server, one to the client; no labels, no checks). What it costs over
  direct is the price of having a broker at all, with these endpoints on
  this machine. Skipped when there is no C compiler.

``--pin CPU`` runs everything on one CPU: latency is then the CPU work on
the critical path, without the cross-CPU wakeups that dominate on a
virtual machine (a brokered connect has three process hops where a direct
one has one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from supervisor.switchboard_client import Handle

CHUNK = 64 * 1024
ROOT = str(Path(__file__).resolve().parent.parent)


# -- the server processes -----------------------------------------------------


def direct_server(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        _answer(conn)


def board_server(board: str) -> None:
    with Handle.connect(board) as root:
        listener = root.server_start({"service": "bench"})
    print("ready", flush=True)
    while True:
        incoming = listener.receive()
        listener.answer(incoming)
        _answer(incoming.socket)


def _answer(conn: socket.socket) -> None:
    with conn:
        if conn.recv(1):
            conn.sendall(b"y")


def _pour(conn: socket.socket, mib: int) -> None:
    block = b"\0" * CHUNK
    with conn:
        for _ in range(mib * 1024 * 1024 // CHUNK):
            conn.sendall(block)


# -- the client side -----------------------------------------------------------


def direct_once(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b"x")
        assert sock.recv(1) == b"y"


def brokered_once(handle: Handle) -> None:
    conn = handle.client_connect({"service": "bench"})
    with conn.socket as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"y"


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_us(op: Callable[[], None], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        op()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def client_loop(kind: str, target: str, n: int) -> None:
    """A worker for connections/s: n operations, then print the elapsed seconds."""
    if kind == "direct":

        def op() -> None:
            direct_once(target)
    else:
        handle = Handle.connect(target)

        def op() -> None:
            brokered_once(handle)

    start = time.perf_counter()
    for _ in range(n):
        op()
    print(time.perf_counter() - start, flush=True)


def rate(kind: str, target: str, n: int, workers: int = 4) -> float:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", "client", kind, target, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(workers)
    ]
    elapsed = [float(p.communicate()[0]) for p in procs]
    return workers * n / max(elapsed)


def read_rate(sock: socket.socket, mib: int) -> float:
    """Read everything; MiB/s from the first byte to EOF (connection setup excluded)."""
    buf = bytearray(CHUNK)
    total = sock.recv_into(buf)
    start = time.perf_counter()
    while got := sock.recv_into(buf):
        total += got
    elapsed = time.perf_counter() - start
    assert total == mib * 1024 * 1024
    return (total - CHUNK) / (1024 * 1024) / elapsed if total > CHUNK else 0.0


def socketpair_mib_s(mib: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _pour(b, mib)
        finally:
            os._exit(0)
    b.close()
    with a:
        result = read_rate(a, mib)
    os.waitpid(pid, 0)
    return result


def brokered_mib_s(handle: Handle, board: str, mib: int) -> float:
    """Like socketpair_mib_s, but the forked writer serves on the switchboard."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with Handle.connect(board) as root:
                listener = root.server_start({"service": "bulk", "writer": str(os.getpid())})
            os.write(ready_w, b"x")
            _pour(listener.accept().socket, mib)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    conn = handle.client_connect({"service": "bulk", "writer": str(pid)})
    with conn.socket as sock:
        result = read_rate(sock, mib)
    os.waitpid(pid, 0)
    return result


# -- the run ------------------------------------------------------------------------


def build_floor(tmp: str) -> str | None:
    """Compile relay_floor.c into ``tmp``; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = f"{tmp}/relay_floor"
    source = str(Path(__file__).resolve().parent / "relay_floor.c")
    subprocess.run([cc, "-O2", "-o", binary, source], check=True)
    return binary


def _start(argv: list[str], word: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if word not in line:
        proc.kill()
        raise SystemExit(f"{argv[:4]} did not start: {line}{proc.stdout.read()}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connects", type=int, default=500, help="connections per round")
    parser.add_argument("--mib", type=int, default=256, help="MiB per bulk transfer")
    parser.add_argument("--pin", type=int, metavar="CPU", help="run everything on this CPU")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # inherited by every process started below
    if args.role:
        role, *rest = args.role
        if role == "direct-server":
            direct_server(rest[0])
        elif role == "board-server":
            board_server(rest[0])
        else:
            client_loop(rest[0], rest[1], int(rest[2]))
        return

    tmp = tempfile.mkdtemp(prefix="capvisor-bench-")
    board, direct, floor = f"{tmp}/board.sock", f"{tmp}/direct.sock", f"{tmp}/floor.sock"
    py = sys.executable
    procs = [
        _start([py, "-m", "supervisor", "switchboard", "serve", board], "serving"),
    ]
    try:
        procs.append(_start([py, __file__, "--role", "direct-server", direct], "ready"))
        procs.append(_start([py, __file__, "--role", "board-server", board], "ready"))
        handle = Handle.connect(board)
        floor_handle = None
        floor_binary = build_floor(tmp)
        if floor_binary is not None:
            procs.append(_start([floor_binary, floor], "serving"))
            procs.append(_start([py, __file__, "--role", "board-server", floor], "ready"))
            floor_handle = Handle.connect(floor)
        measures = ("lat_d", "lat_b", "lat_f", "rate_d", "rate_b", "bulk_d", "bulk_b", "broker_cpu")
        results: dict[str, list[float]] = {k: [] for k in measures}
        per_worker = args.connects
        for _ in range(args.rounds):
            results["lat_d"].append(latency_us(lambda: direct_once(direct), args.connects))
            before = cpu_seconds(procs[0].pid)
            results["lat_b"].append(latency_us(lambda: brokered_once(handle), args.connects))
            spent = cpu_seconds(procs[0].pid) - before
            results["broker_cpu"].append(spent / args.connects * 1e6)
            if floor_handle is not None:
                results["lat_f"].append(
                    latency_us(lambda: brokered_once(floor_handle), args.connects)
                )
            results["rate_d"].append(rate("direct", direct, per_worker))
            results["rate_b"].append(rate("board", board, per_worker))
            results["bulk_d"].append(socketpair_mib_s(args.mib))
            results["bulk_b"].append(brokered_mib_s(handle, board, args.mib))
        med = {k: statistics.median(v) for k, v in results.items() if v}

        def paired(ours: str, base: str) -> float:
            """Median of the per-round ratios: robust when a round is hit by noise."""
            pairs = zip(results[ours], results[base], strict=True)
            return statistics.median(o / b for o, b in pairs)

        pinned = f" pinned to CPU {args.pin}" if args.pin is not None else ""
        print(f"rounds={args.rounds} connects/round={args.connects} bulk={args.mib} MiB{pinned}")
        print("| measure | direct / socketpair (baseline) | brokered | ratio | per-round ratio |")
        print("|---|---:|---:|---:|---:|")
        rows = [
            ("connect + 1-byte round trip, µs", "lat_d", "lat_b"),
            ("connections/s, 4 clients", "rate_d", "rate_b"),
            ("bulk throughput, MiB/s", "bulk_d", "bulk_b"),
        ]
        if "lat_f" in med:
            rows.append(("floor: connect through relay_floor.c, µs", "lat_d", "lat_f"))
        for label, base, ours in rows:
            print(
                f"| {label} | {med[base]:.0f} | {med[ours]:.0f} "
                f"| {med[ours] / med[base]:.2f} | {paired(ours, base):.2f} |"
            )
        if "lat_f" in med:
            print(
                f"capvisor's broker over the floor: {med['lat_b'] / med['lat_f']:.2f} times "
                f"(+{med['lat_b'] - med['lat_f']:.0f} µs)"
            )
        else:
            print("floor: skipped (no C compiler)")
        print(f"broker CPU per brokered connection (utime+stime): {med['broker_cpu']:.0f} µs")
        print("per round:", {k: [round(x) for x in v] for k, v in results.items()})
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
