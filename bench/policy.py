"""Policy compile cost and filter length, for each shipped policy.

Run: .venv/bin/python bench/policy.py [--rounds N]

For every policy in policies/ (default, compute, service, python, shell),
each round measures, interleaved so that a noisy neighbour hits all alike:

- load+compile  ``load_policy`` + ``compile_policy``: reading the YAML (and
                its includes), checking, expanding groups, libseccomp, guard;
                what ``capvisor`` pays once per policy file change;
- compile       ``compile_policy`` of an already loaded policy;
- libseccomp    the baseline: the same rules added to a fresh
                ``pyseccomp.SyscallFilter`` and exported as BPF, i.e. what
                any libseccomp user pays for this filter with no language on
                top;
- cached        ``compiled(name)`` when nothing changed (a stat per file).

Medians in ms; the ratio is compile / libseccomp. Also the filter length in
BPF instructions (kernel limit 4096) and the number of syscalls with a rule.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyseccomp

from supervisor import policy
from supervisor.native import BPF_MAXINSNS

SHIPPED = ("default", "compute", "service", "python", "shell")


def libseccomp_only(loaded: policy.Policy) -> Callable[[], bytes]:
    """The baseline: libseccomp building and exporting the same rules."""
    rules = [
        (
            r.action.seccomp,
            r.number,
            [pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, c.mask, c.value) for c in r.checks],
        )
        for r in loaded.rules
        if r.action != loaded.default
    ]

    def build() -> bytes:
        scf = pyseccomp.SyscallFilter(loaded.default.seccomp)
        scf.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
        for action, number, args in rules:
            scf.add_rule(action, number, *args)
        return policy._export(scf, pfc=False)

    return build


def measure(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter_ns()
            fn()
            samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    print(f"median of {args.rounds} interleaved rounds (ms)")
    print(
        "| policy | load+compile | compile | libseccomp | ratio | cached "
        "| BPF instructions | syscalls with a rule |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SHIPPED:
        loaded = policy.load_policy(name)
        policy.compiled(name)
        variants: dict[str, Callable[[], object]] = {
            "load+compile": lambda n=name: policy.compile_policy(policy.load_policy(n)),
            "compile": lambda p=loaded: policy.compile_policy(p),
            "libseccomp": libseccomp_only(loaded),
            "cached": lambda n=name: policy.compiled(n),
        }
        t = measure(variants, args.rounds)
        compiled = policy.compile_policy(loaded)
        assert compiled.instructions <= BPF_MAXINSNS
        emitted = {r.syscall for r in loaded.rules if r.action != loaded.default}
        print(
            f"| {name} | {t['load+compile']:.2f} | {t['compile']:.2f} | {t['libseccomp']:.2f} "
            f"| {t['compile'] / t['libseccomp']:.2f} | {t['cached']:.3f} "
            f"| {compiled.instructions} | {len(emitted)} |"
        )


if __name__ == "__main__":
    main()
