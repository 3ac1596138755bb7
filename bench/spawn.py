"""Spawn cost: capvisor's confined spawn of /bin/true against os.posix_spawn.

Run: .venv/bin/python bench/spawn.py [--rounds N] [--ballast-gib G]

Each round runs every variant once, interleaved, so a noisy neighbour hits all
of them alike; medians over the rounds are reported, with the ratio to the
baseline measured in the same round set. fork+exec is measured in its own
block after the others: a fork leaves the parent's whole address space
write-protected, and the copy-on-write faults the parent takes afterwards
would be charged to whichever variant ran next. Variants, each
spawn-and-wait:

- posix_spawn   os.posix_spawn(/bin/true) + waitpid: the baseline (glibc's
                posix_spawn also uses CLONE_VM|CLONE_VFORK);
- fork+exec     os.fork() + os.execv: what spawn cost looks like when it grows
                with the parent's memory;
- capvisor      native.spawn of a resolved plan (default policy + Landlock +
                fd placement), as a supervisor restarting a program does;
- capvisor+resolve  resolve the description (policy and runtime set cached,
                Landlock ruleset and fds built anew) then spawn: the whole path.
- capvisor/no-seccomp  the prepared request without a filter, and
  capvisor/POLICY  with each shipped policy's filter instead of the
                description's (default, compute, service, python, shell):
                the difference is the per-spawn cost of installing that
                policy (issue 3). capvisor/default+audit adds audit mode's
                listener hand-over (no call of /bin/true is denied).

Then the same again with a ballast of touched memory in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from supervisor import native, policy, seccomp_notify
from supervisor.description import load_description
from supervisor.resolve import resolve

TRUE = "/bin/true"


def posix_spawn() -> None:
    pid = os.posix_spawn(TRUE, [TRUE], {})
    os.waitpid(pid, 0)


def fork_exec() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(TRUE, [TRUE])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


Thunk = Callable[[], None]


def make_capvisor(description: Path) -> tuple[Thunk, Thunk, Thunk]:
    plan = resolve(load_description(description))
    request = plan.spawn_request()

    def prepared() -> None:
        child = native.spawn(request)
        os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        os.close(child.pidfd)

    def full() -> None:
        fresh = resolve(load_description(description))
        try:
            child = native.spawn(fresh.spawn_request())
            fresh.close_child_side()
            os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
            os.close(child.pidfd)
        finally:
            fresh.close()

    return prepared, full, plan.close


SHIPPED_POLICIES = ("default", "compute", "service", "python", "shell")


def policy_variants(description: Path) -> tuple[dict[str, Thunk], Thunk]:
    """The prepared spawn with no filter, with each shipped policy, and with audit."""
    plan = resolve(load_description(description))
    base = plan.spawn_request()

    def spawner(request: native.SpawnRequest) -> Thunk:
        def run() -> None:
            child = native.spawn(request)
            os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
            os.close(child.pidfd)
            if child.listener >= 0:
                os.close(child.listener)

        return run

    variants = {"capvisor/no-seccomp": spawner(dataclasses.replace(base, seccomp_bpf=None))}
    for name in SHIPPED_POLICIES:
        bpf = policy.compiled(name).bpf
        variants[f"capvisor/{name}"] = spawner(dataclasses.replace(base, seccomp_bpf=bpf))
    audited = seccomp_notify.audit_program(policy.compiled("default"), chan=len(base.fds))
    variants["capvisor/default+audit"] = spawner(
        dataclasses.replace(base, seccomp_bpf=audited, seccomp_listener=True)
    )
    return variants, plan.close


def measure(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm caches
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter_ns()
            fn()
            samples[name].append((time.perf_counter_ns() - start) / 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def ballast(gib: float) -> bytearray:
    size = int(gib * (1 << 30))
    block = bytearray(size)
    for offset in range(0, size, 4096):  # touch every page so it is resident
        block[offset] = 1
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--ballast-gib", type=float, default=1.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        description = Path(tmp) / "true.yaml"
        description.write_text(
            f"program: {TRUE}\n"
            "stdout: !file {path: /dev/null, mode: w}\n"
            "stderr: !file {path: /dev/null, mode: w}\n"
            "fds: {a: !file {path: /dev/null}, b: !file {path: /dev/null}}\n"
        )
        prepared, full, close = make_capvisor(description)
        per_policy, close_policies = policy_variants(description)
        variants = {
            "posix_spawn": posix_spawn,
            "capvisor": prepared,
            "capvisor+resolve": full,
            **per_policy,
        }
        forking = {"fork+exec": fork_exec}
        try:
            small = measure(variants, args.rounds) | measure(forking, args.rounds)
            held = ballast(args.ballast_gib)
            big = measure(variants, args.rounds) | measure(forking, args.rounds)
            del held
        finally:
            close()
            close_policies()

    base_small, base_big = small["posix_spawn"], big["posix_spawn"]
    print(f"spawn+wait of {TRUE}, median of {args.rounds} interleaved rounds (µs)")
    print(f"| variant | no ballast | ratio | {args.ballast_gib:g} GiB ballast | ratio | growth |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in [*variants, *forking]:
        print(
            f"| {name} | {small[name]:.0f} | {small[name] / base_small:.2f} "
            f"| {big[name]:.0f} | {big[name] / base_big:.2f} | {big[name] / small[name]:.2f} |"
        )


if __name__ == "__main__":
    main()
