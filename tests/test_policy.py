"""Tests for supervisor.policy: the policy language, the compiler, default.yaml.

Filters are checked on real processes: ``tests/seccomp_exec.py`` installs a
compiled program and execs a command, ``probe`` (a small C program compiled
here) makes one raw syscall and prints ``RET ERRNO``. Allowed calls are given
bad fds or pointers so they fail with EBADF/EFAULT/EINVAL, while a denied
call fails with the policy's errno (or is killed): the two stay apart.
A small classic-BPF interpreter checks properties that need many calls.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyseccomp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import policy as P
from supervisor.errors import PolicyError
from supervisor.syscall_groups import ALWAYS_DENIED, CONSTANTS, GROUPS, UNGROUPED, expand

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECCOMP_EXEC = HERE / "seccomp_exec.py"
AUDIT_ARCH_I386 = 0x40000003
X32_BIT = 0x40000000

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* probe NR [ARGS...]: one raw syscall, prints "RET ERRNO".
   probe int80: i386 getpid (20) through int $0x80. */
int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "int80") == 0) {
        long ret;
        __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
        printf("%ld 0\n", ret);
        return 0;
    }
    long a[7] = {0};
    for (int i = 1; i < argc && i <= 7; i++)
        a[i - 1] = (long)strtoull(argv[i], NULL, 0);
    errno = 0;
    long ret = syscall(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
    printf("%ld %d\n", ret, ret == -1 ? errno : 0);
    return 0;
}
"""
HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello, world"); return 0; }\n'

PYTHONS = (
    "/usr/bin/python3",
    "/root/.pyenv/versions/3.11.7/bin/python3.11",
    "/tmp/v/bin/python",
)
PYTHON_CODE = (
    "import json, os, re, hashlib; "
    "print(json.dumps({'sub': re.sub('a+', 'b', 'caaat'), "
    "'sha': hashlib.sha256(b'capvisor').hexdigest()[:12], 'pid': os.getpid() > 0}))"
)
_SHA = hashlib.sha256(b"capvisor").hexdigest()[:12]
PYTHON_OUT = f'{{"sub": "cbt", "sha": "{_SHA}", "pid": true}}\n'
SHELL_SCRIPT = (
    'echo hi | cat; n=$(ls / | sort | wc -l); test "$n" -gt 3 && echo many; '
    "printf 'b\\na\\nc\\n' | sort | tr '\\n' ' '; echo; seq 1 5 | wc -l; "
    'x=$(echo inner); echo "got $x"; ls /nonexistent 2>/dev/null || echo missing'
)
SHELL_OUT = "hi\nmany\na b c \n5\ngot inner\nmissing\n"

#: Just enough for the probe (a dynamically linked C program) to run.
PROBE_BASE = """\
allow: ["@default", "@basic-io", "@file-system"]
allow_if: {prlimit64: {arg0: {eq: 0}}}
"""


def nr(name: str) -> int:
    return P.syscall_number(name)


# ---------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="session")
def cbin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``probe`` and ``hello`` compiled by gcc."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the probe programs")
    out = tmp_path_factory.mktemp("cbin")
    for name, source in (("probe", PROBE_C), ("hello", HELLO_C)):
        (out / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-O1", "-o", out / name, out / f"{name}.c"], check=True)
    return out


def write_policy(directory: Path, text: str, name: str = "p.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def run_under(
    bpf: bytes, argv: Sequence[str | os.PathLike[str]], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under ``bpf`` through seccomp_exec.py."""
    bpf_file = tmp_path / "filter.bpf"
    bpf_file.write_bytes(bpf)
    return subprocess.run(
        [sys.executable, SECCOMP_EXEC, bpf_file, "--", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def probe_outcome(
    bpf: bytes | None, cbin: Path, tmp_path: Path, *call: int | str
) -> tuple[int, str] | int:
    """``(ret, errno name)`` of one syscall under ``bpf`` (None: unconfined), or
    the negative signal number that killed the probe."""
    argv: list[str | os.PathLike[str]] = [cbin / "probe"]
    argv += [hex(c) if isinstance(c, int) else c for c in call]
    if bpf is None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    else:
        result = run_under(bpf, argv, tmp_path)
    if result.returncode < 0:
        return result.returncode
    assert result.returncode == 0, result.stderr
    ret, err = result.stdout.split()
    return int(ret), errno.errorcode.get(int(err), "0")


def probe(bpf: bytes | None, cbin: Path, tmp_path: Path, *call: int | str) -> tuple[int, str]:
    """``(ret, errno name)`` of one syscall; the probe must not be killed."""
    outcome = probe_outcome(bpf, cbin, tmp_path, *call)
    assert isinstance(outcome, tuple), f"killed by signal {-outcome}"
    return outcome


def compile_text(tmp_path: Path, text: str, name: str = "p.yaml") -> P.CompiledPolicy:
    return P.compile_policy(P.load_policy(str(write_policy(tmp_path, text, name))))


def compile_for_probe(tmp_path: Path, text: str) -> P.CompiledPolicy:
    """``text`` plus what the probe needs to start (through an include)."""
    write_policy(tmp_path, PROBE_BASE, "probe-base.yaml")
    return compile_text(tmp_path, "include: probe-base.yaml\n" + text)


def problems(tmp_path: Path, text: str, name: str = "p.yaml") -> list[str]:
    path = write_policy(tmp_path, text, name)
    with pytest.raises(PolicyError) as info:
        P.load_policy(str(path))
    return [str(p) for p in info.value.problems]


def evaluate(bpf: bytes, number: int, args: Sequence[int] = (), arch: int = P.NATIVE_ARCH) -> int:
    """Run a seccomp BPF program on one syscall; returns the SECCOMP_RET_* value."""
    full = [*args, *[0] * (6 - len(args))]
    data = struct.pack("=iIQ6Q", number - (1 << 32) * (number >= 1 << 31), arch, 0, *full)
    insns = [struct.unpack_from("=HBBI", bpf, i) for i in range(0, len(bpf), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # and #k
            acc &= k
        elif code == 0x06:  # ret #k
            return int(k)
        elif code == 0x05:  # ja
            pc += k
        elif code & 0x07 == 0x05:  # jeq, jgt, jge, jset
            test = {0x10: acc == k, 0x20: acc > k, 0x30: acc >= k, 0x40: acc & k != 0}
            pc += jt if test[code & 0xF0] else jf
        else:
            raise AssertionError(f"unexpected BPF code {code:#x}")
        pc += 1


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    P.clear_cache()
    return P.compiled("default").bpf


# ---------------------------------------------------------------------------
# default.yaml runs real programs.


def test_default_runs_true_ls_and_hello(default_bpf: bytes, cbin: Path, tmp_path: Path) -> None:
    assert run_under(default_bpf, ["/bin/true"], tmp_path).returncode == 0
    ls = run_under(default_bpf, ["/bin/ls", "/"], tmp_path)
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout == subprocess.run(["/bin/ls", "/"], capture_output=True, text=True).stdout
    hello = run_under(default_bpf, [cbin / "hello"], tmp_path)
    assert (hello.returncode, hello.stdout) == (0, "hello, world\n")


def test_default_runs_shell_with_coreutils(default_bpf: bytes, tmp_path: Path) -> None:
    result = run_under(default_bpf, ["/bin/sh", "-c", SHELL_SCRIPT], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, SHELL_OUT, "")


def test_default_runs_ls_long(default_bpf: bytes, tmp_path: Path) -> None:
    # ls -l asks nscd over a unix socket first: socket() fails, it reads files.
    result = run_under(default_bpf, ["/bin/ls", "-l", "/etc/passwd"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert " root root " in result.stdout


@pytest.mark.parametrize("python", PYTHONS)
def test_default_runs_python(default_bpf: bytes, tmp_path: Path, python: str) -> None:
    if not Path(python).exists():
        pytest.skip(f"{python} is not installed here")
    result = run_under(default_bpf, [python, "-c", PYTHON_CODE], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, PYTHON_OUT, "")


def test_default_python_threads_and_subprocess(default_bpf: bytes, tmp_path: Path) -> None:
    # Threads use clone3 -> ENOSYS -> clone; subprocess uses vfork/clone.
    code = (
        "import threading, subprocess; t = threading.Thread(target=print, args=('thread',)); "
        "t.start(); t.join(); print(subprocess.run(['/bin/echo', 'child'], "
        "capture_output=True, text=True).stdout, end='')"
    )
    result = run_under(default_bpf, [sys.executable, "-c", code], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "thread\nchild\n", "")


# ---------------------------------------------------------------------------
# default.yaml denies, with EPERM, what a denial test can tell apart.


@pytest.mark.parametrize(
    ("call", "confined", "unconfined"),
    [
        # socket() is denied; unconfined it would succeed.
        pytest.param(
            (nr("socket"), socket.AF_INET, socket.SOCK_STREAM, 0), "EPERM", "0", id="socket"
        ),
        # mount with bad pointers: EPERM when denied, EFAULT when it reaches the kernel.
        pytest.param((nr("mount"), 1, 1, 1, 0, 1), "EPERM", "EFAULT", id="mount"),
        # clone3 with no arguments: ENOSYS by policy, EINVAL from the kernel.
        pytest.param((nr("clone3"), 0, 0), "ENOSYS", "EINVAL", id="clone3"),
        # A new user namespace (with CLONE_THREAD: the kernel refuses the combination).
        pytest.param(
            (nr("clone"), CONSTANTS["CLONE_NEWUSER"] | CONSTANTS["CLONE_THREAD"], 0),
            "EPERM",
            "EINVAL",
            id="clone-newuser",
        ),
        pytest.param(
            (nr("socketpair"), socket.AF_INET, socket.SOCK_STREAM, 0, 0),
            "EPERM",
            "EFAULT",
            id="socketpair-inet",
        ),
        # Another process's rlimits (pid 1): denied; ours: allowed (bad pointer).
        pytest.param((nr("prlimit64"), 1, 0, 0, 0), "EPERM", "0", id="prlimit-other"),
        pytest.param((nr("prlimit64"), 0, 0, 0, 1), "EFAULT", "EFAULT", id="prlimit-self"),
        # Allowed calls on a bad fd fail with EBADF, not EPERM.
        pytest.param((nr("read"), 0xFFFF, 0, 0), "EBADF", "EBADF", id="read"),
        pytest.param((nr("ioctl"), 0xFFFF, termios.TCGETS, 0), "EBADF", "EBADF", id="tcgets"),
        pytest.param((nr("accept4"), 0xFFFF, 0, 0, 0), "EBADF", "EBADF", id="accept4"),
        pytest.param((nr("ioctl"), 0xFFFF, 0x5412, 0), "EPERM", "EBADF", id="tiocsti"),
        pytest.param((nr("ptrace"), 16, 0, 0, 0), "EPERM", "ESRCH", id="ptrace"),
        pytest.param((nr("bpf"), 0, 0, 0), "EPERM", "EINVAL", id="bpf"),
        pytest.param((nr("personality"), 0xFFFFFFFF), "0", "0", id="personality-query"),
        pytest.param((nr("personality"), 0x0040000), "EPERM", "0", id="personality-aslr"),
    ],
)
def test_default_denials(
    default_bpf: bytes,
    cbin: Path,
    tmp_path: Path,
    call: tuple[int, ...],
    confined: str,
    unconfined: str,
) -> None:
    assert probe(default_bpf, cbin, tmp_path, *call)[1] == confined
    assert probe(None, cbin, tmp_path, *call)[1] == unconfined


def test_socketpair_unix_allowed(default_bpf: bytes, cbin: Path, tmp_path: Path) -> None:
    # A bad pointer for the fd pair: allowed means EFAULT.
    call = (nr("socketpair"), socket.AF_UNIX, socket.SOCK_STREAM, 0, 1)
    assert probe(default_bpf, cbin, tmp_path, *call) == (-1, "EFAULT")


# ---------------------------------------------------------------------------
# Foreign architectures.


def test_i386_int80_is_killed(default_bpf: bytes, cbin: Path, tmp_path: Path) -> None:
    unconfined = probe_outcome(None, cbin, tmp_path, "int80")
    if not (isinstance(unconfined, tuple) and unconfined[0] > 0):
        pytest.skip(f"no i386 emulation in this kernel ({unconfined})")
    assert probe_outcome(default_bpf, cbin, tmp_path, "int80") == -signal.SIGSYS


def test_x32_syscall_is_killed(default_bpf: bytes, cbin: Path, tmp_path: Path) -> None:
    # libseccomp 2.5 sends nr >= 0x40000000 (but not -1) on an x86_64-only
    # filter to the bad-arch action: KILL_PROCESS.
    assert probe_outcome(default_bpf, cbin, tmp_path, X32_BIT | nr("getpid")) == -signal.SIGSYS
    assert (
        probe_outcome(default_bpf, cbin, tmp_path, X32_BIT | nr("read"), 0xFFFF) == -signal.SIGSYS
    )


def test_foreign_arch_and_x32_in_bpf(default_bpf: bytes, tmp_path: Path) -> None:
    kill = pyseccomp.KILL_PROCESS
    assert evaluate(default_bpf, nr("getpid")) == pyseccomp.ALLOW
    assert evaluate(default_bpf, 20, arch=AUDIT_ARCH_I386) == kill
    for number in (X32_BIT, X32_BIT | 39, 0x7FFFFFFF, 0xFFFFFFFE):
        assert evaluate(default_bpf, number) == kill
    guarded = compile_for_probe(tmp_path, "allow_if: {ioctl: {arg0: nonneg_fd}}\n").bpf
    assert evaluate(guarded, 54, arch=AUDIT_ARCH_I386) == kill
    assert evaluate(guarded, X32_BIT | 514, (0, 0x5412)) == kill


# ---------------------------------------------------------------------------
# ALWAYS_DENIED and the guard.


def test_always_denied_wins_over_explicit_allow(cbin: Path, tmp_path: Path) -> None:
    compiled = compile_for_probe(tmp_path, "allow: [ptrace, unshare, getpid]\n")
    assert probe(compiled.bpf, cbin, tmp_path, nr("ptrace"), 16, 0, 0, 0) == (-1, "EPERM")
    assert probe(compiled.bpf, cbin, tmp_path, nr("unshare"), 0) == (-1, "EPERM")
    assert probe(compiled.bpf, cbin, tmp_path, nr("getpid"))[1] == "0"
    ptrace = [r for r in compiled.policy.rules if r.syscall == "ptrace"]
    assert [(str(r.action), r.origin.section) for r in ptrace] == [("EPERM", "always denied")]
    lost = [r for r in compiled.policy.overridden if r.syscall == "ptrace"]
    assert [r.origin.section for r in lost] == ["allow"]


def test_always_denied_under_kill_default_gets_eperm(cbin: Path, tmp_path: Path) -> None:
    compiled = compile_for_probe(tmp_path, "default: kill\nallow: [ptrace]\n")
    assert probe(compiled.bpf, cbin, tmp_path, nr("ptrace"), 16, 0, 0, 0) == (-1, "EPERM")
    assert probe_outcome(compiled.bpf, cbin, tmp_path, nr("socket"), 1, 1, 0) == -signal.SIGSYS


def test_errno_chooses_the_error_of_an_always_denied_call(cbin: Path, tmp_path: Path) -> None:
    compiled = compile_for_probe(tmp_path, "errno: {io_uring_setup: ENOSYS}\n")
    assert probe(compiled.bpf, cbin, tmp_path, nr("io_uring_setup"), 1, 0) == (-1, "ENOSYS")


def test_guard_denies_tiocsti_when_ioctl_is_allowed(cbin: Path, tmp_path: Path) -> None:
    compiled = compile_for_probe(tmp_path, "allow: [ioctl]\n")
    assert "ioctl" in compiled.policy.guards()
    assert probe(compiled.bpf, cbin, tmp_path, nr("ioctl"), 0xFFFF, termios.TCGETS) == (
        -1,
        "EBADF",
    )
    for cmd in (0x5412, 0x541C, 0xFFFFFFFF_00005412):  # garbage in the high half too
        assert probe(compiled.bpf, cbin, tmp_path, nr("ioctl"), 0xFFFF, cmd) == (-1, "EPERM")
    assert "guard for syscall 'ioctl'" in compiled.pfc()


def test_guard_limits_personality(cbin: Path, tmp_path: Path) -> None:
    compiled = compile_for_probe(tmp_path, "allow: [personality]\n")
    assert probe(compiled.bpf, cbin, tmp_path, nr("personality"), 0xFFFFFFFF)[1] == "0"
    assert probe(compiled.bpf, cbin, tmp_path, nr("personality"), 0x8)[1] == "0"
    for bad in (0x0040000, 0x0400000, 0xFFFFFFFF_00040000):
        assert probe(compiled.bpf, cbin, tmp_path, nr("personality"), bad) == (-1, "EPERM")


def test_no_guard_when_conditions_already_exclude_the_values(tmp_path: Path) -> None:
    compiled = compile_text(tmp_path, "allow_if: {ioctl: {arg1: {any_of: [TCGETS]}}}\n")
    assert compiled.policy.guards() == {}
    assert "capvisor guard" not in compiled.pfc()
    hostile = compile_text(tmp_path, "allow_if: {ioctl: {arg1: {any_of: [TIOCSTI]}}}\n")
    assert hostile.policy.guards() == {"ioctl": ALWAYS_DENIED["ioctl"]}
    assert evaluate(hostile.bpf, nr("ioctl"), (0, 0x5412)) == pyseccomp.ERRNO(errno.EPERM)


# ---------------------------------------------------------------------------
# 32-bit arguments are compared through a mask.


def test_masked_compare_sees_what_the_kernel_sees(cbin: Path, tmp_path: Path) -> None:
    text = "allow_if: {socket: {arg0: {any_of: [AF_UNIX]}}}\n"
    compiled = compile_for_probe(tmp_path, text)
    garbage_unix = 0xFFFFFFFF_00000001
    # The kernel reads `int family`: garbage in the high half is still AF_UNIX.
    ret, err = probe(compiled.bpf, cbin, tmp_path, nr("socket"), garbage_unix, 1, 0)
    assert (ret >= 0, err) == (True, "0")
    assert probe(compiled.bpf, cbin, tmp_path, nr("socket"), socket.AF_INET, 1, 0) == (
        -1,
        "EPERM",
    )
    allow, eperm = pyseccomp.ALLOW, pyseccomp.ERRNO(errno.EPERM)
    assert evaluate(compiled.bpf, nr("socket"), (garbage_unix, 1)) == allow
    assert evaluate(compiled.bpf, nr("socket"), (0xFFFFFFFF_00000002, 1)) == eperm
    # A plain 64-bit EQ would have judged the same call by its garbage.
    naive = pyseccomp.SyscallFilter(eperm)
    naive.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.EQ, 1))
    naive_bpf = P._export(naive, pfc=False)
    assert evaluate(naive_bpf, nr("socket"), (garbage_unix, 1)) == eperm


def test_every_emitted_comparison_is_masked_32_bit() -> None:
    policy = P.load_policy("default")
    checks = [c for r in policy.rules for c in r.checks]
    assert checks, "default.yaml has conditions"
    # The one 64-bit comparison is null_pointer (utimensat's path), against zero.
    wide = [c for c in checks if c.mask > P.MASK32]
    assert {(c.mask, c.value) for c in wide} == {(P.MASK64, 0)}
    narrow = [c for c in checks if c.mask <= P.MASK32]
    assert all(c.mask > 0 and c.value & ~c.mask == 0 for c in narrow)
    assert "$a0.hi32 & 0x00000000 == 0" in P.export_pfc(policy)


@pytest.mark.parametrize(
    ("condition", "matches", "misses"),
    [
        ("{any_of: [AF_UNIX, AF_INET6]}", [1, 10, 0xFFFFFFFF_0000000A], [2, 0, 0x1_00000002]),
        ("{none_of_mask: [CLONE_NEWUSER, CLONE_NEWNS]}", [0x11, 0x1_00000000], [0x10000000]),
        ("nonneg_fd", [0, 5, 0x7FFFFFFF, 0xFFFFFFFF_00000003], [0xFFFFFF9C, 0x80000000]),
        ("{eq: 0}", [0, 0xFFFFFFFF_00000000], [1]),
        ("{eq: 0x10, mask: 0xf0}", [0x10, 0x1F, 0x110], [0x20, 0]),
        ("{any_of: [AT_FDCWD, -1]}", [0xFFFFFF9C, 0xFFFFFFFF], [100]),
        # A pointer with a zero low half is not NULL: all 64 bits count.
        ("null_pointer", [0], [1, 0x1_00000000, 0xFFFFFFFF_00000000]),
    ],
)
def test_condition_kinds(
    tmp_path: Path, condition: str, matches: list[int], misses: list[int]
) -> None:
    compiled = compile_text(tmp_path, f"allow_if: {{fcntl: {{arg0: {condition}}}}}\n")
    for value in matches:
        assert evaluate(compiled.bpf, nr("fcntl"), (value,)) == pyseccomp.ALLOW, hex(value)
    for value in misses:
        assert evaluate(compiled.bpf, nr("fcntl"), (value,)) != pyseccomp.ALLOW, hex(value)


def test_alternatives_and_and(tmp_path: Path) -> None:
    text = """\
allow_if:
  fcntl:
    - {arg0: nonneg_fd, arg1: {any_of: [F_GETFD, F_SETFD]}}
    - {arg1: {eq: F_GETFL}}
"""
    compiled = compile_text(tmp_path, text)
    assert len([r for r in compiled.policy.rules if r.syscall == "fcntl"]) == 3
    allow = pyseccomp.ALLOW
    assert evaluate(compiled.bpf, nr("fcntl"), (3, 1)) == allow
    assert evaluate(compiled.bpf, nr("fcntl"), (3, 2)) == allow
    assert evaluate(compiled.bpf, nr("fcntl"), (0x80000000, 2)) != allow  # AND
    assert evaluate(compiled.bpf, nr("fcntl"), (0x80000000, 3)) == allow  # alternative
    assert evaluate(compiled.bpf, nr("fcntl"), (3, 4)) != allow


# ---------------------------------------------------------------------------
# Errors, each with its location.

ERROR_CASES = [
    ("unknown-key", "version: 1\nallwo: [read]\n", 2, 1, "unknown key 'allwo'"),
    ("unknown-syscall", "allow: [read, raed]\n", 1, 15, "unknown syscall 'raed'"),
    ("foreign-syscall", "allow: [read, _llseek]\n", 1, 15, "not a syscall on x86_64"),
    ("unknown-group", 'allow: ["@basic-oi"]\n', 1, 9, "unknown group @basic-oi"),
    ("deny-unknown", "deny: [ptrace, nosuch]\n", 1, 16, "unknown syscall 'nosuch'"),
    (
        "unknown-constant",
        "allow_if:\n  socket: {arg0: {any_of: [AF_UNIX, AF_INETT]}}\n",
        2,
        37,
        "unknown constant 'AF_INETT'",
    ),
    ("unknown-errno", "errno: {clone3: ENOSYSS}\n", 1, 17, "unknown errno: 'ENOSYSS'"),
    ("unknown-default", "default: EPREM\n", 1, 10, "unknown default"),
    ("default-allow", "default: allow\n", 1, 10, "cannot be allow"),
    (
        "both-allows",
        "allow: [socket]\nallow_if:\n  socket: {arg0: {any_of: [AF_UNIX]}}\n",
        3,
        3,
        "libseccomp would drop the conditions",
    ),
    (
        "both-via-group",
        'allow: ["@socket"]\nallow_if:\n  socket: {arg0: {any_of: [AF_UNIX]}}\n',
        3,
        3,
        "unconditionally (allow via @socket at",
    ),
    (
        "errno-equals-default",
        "default: EPERM\nerrno: {clone3: EPERM}\n",
        2,
        9,
        "already the default action",
    ),
    ("list-expected", "allow: read\n", 1, 8, "allow must be a list"),
    ("string-expected", "allow: [read, 3]\n", 1, 15, "expected one of syscall"),
    ("map-expected", "errno: [clone3]\n", 1, 8, "errno must be a mapping"),
    (
        "bad-arg",
        "allow_if:\n  socket: {arg6: {any_of: [AF_UNIX]}}\n",
        2,
        12,
        "unknown argument 'arg6'",
    ),
    (
        "group-conditions",
        'allow_if:\n  "@socket": {arg0: {any_of: [AF_UNIX]}}\n',
        2,
        3,
        "not to the group @socket",
    ),
    (
        "two-kinds",
        "allow_if:\n  socket: {arg0: {any_of: [1], eq: 1}}\n",
        2,
        18,
        "exactly one of",
    ),
    (
        "unknown-condition",
        "allow_if:\n  socket: {arg0: {one_of: [1]}}\n",
        2,
        19,
        "unknown key 'one_of' in a condition",
    ),
    (
        "outside-mask",
        "allow_if:\n  personality: {arg0: {eq: 3, mask: 1}}\n",
        2,
        28,
        "outside the mask",
    ),
    ("too-wide", "allow_if:\n  socket: {arg0: {eq: 0x100000000}}\n", 2, 23, "32 bits"),
    ("empty-entry", "allow_if:\n  socket: {}\n", 2, 11, "non-empty mapping"),
    ("bad-version", "version: 2\nallow: [read]\n", 1, 10, "unsupported policy version 2"),
    ("include-missing", "include: [nothere.yaml]\n", 1, 11, "cannot include"),
    ("not-a-map", "- read\n", 1, 1, "a policy is a mapping"),
    ("yaml-syntax", "allow: [read\n", 2, 1, "invalid YAML"),
    ("unquoted-group", "allow: [@default]\n", 1, 9, "invalid YAML"),
]


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
def test_errors_have_locations(
    tmp_path: Path, text: str, line: int, column: int, message: str
) -> None:
    found = problems(tmp_path, text)
    expected = f"{tmp_path / 'p.yaml'}:{line}:{column}: "
    assert any(p.startswith(expected) and message in p for p in found), found


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = "allow: [raed, _llseek]\nerrno: {clone3: ENOSYSS}\nbogus: 1\n"
    found = problems(tmp_path, text)
    assert [p.split(": ")[0].rsplit(":", 2)[1:] for p in found] == [
        ["1", "9"],
        ["1", "15"],
        ["2", "17"],
        ["3", "1"],
    ]


def test_conflicting_errnos(tmp_path: Path) -> None:
    write_policy(tmp_path, "errno: {clone3: ENOSYS}\n", "base.yaml")
    found = problems(tmp_path, "include: base.yaml\nerrno: {clone3: EINVAL}\n")
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'p.yaml'}:2:9: ")
    assert "conflicts with ENOSYS" in found[0] and "base.yaml:1:9" in found[0]


def test_errno_by_number_and_for_a_group(tmp_path: Path) -> None:
    policy = P.load_policy(str(write_policy(tmp_path, 'errno: {clone3: 38, "@aio": EINVAL}\n')))
    actions = {r.syscall: str(r.action) for r in policy.rules}
    assert actions["clone3"] == "ENOSYS"
    assert actions["io_setup"] == actions["io_uring_setup"] == "EINVAL"
    assert actions["ptrace"] == "EPERM"


def test_groups_skip_foreign_names(tmp_path: Path) -> None:
    policy = P.load_policy(str(write_policy(tmp_path, 'allow: ["@basic-io"]\n')))
    assert "_llseek" in GROUPS["@basic-io"].members
    assert "_llseek" not in policy.allowed()
    assert {"read", "write", "close"} <= policy.allowed()
    rule = next(r for r in policy.rules if r.syscall == "read")
    assert rule.origin.via == ("@basic-io",)
    assert str(rule.origin) == f"allow via @basic-io at {tmp_path / 'p.yaml'}:1:9"


def test_nested_groups_record_the_path(tmp_path: Path) -> None:
    policy = P.load_policy(str(write_policy(tmp_path, 'deny: ["@privileged"]\n')))
    chown = next(r for r in policy.rules if r.syscall == "fchown")
    assert chown.origin.via == ("@privileged", "@chown")


# ---------------------------------------------------------------------------
# Finding and including policies.


def test_find_policy_by_name_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert P.find_policy("default") == P.POLICIES_DIR / "default.yaml"
    write_policy(tmp_path, "allow: [read]\n", "mine.yaml")
    assert P.find_policy("mine.yaml", relative_to=tmp_path) == tmp_path / "mine.yaml"
    assert P.find_policy(str(tmp_path / "mine.yaml")) == tmp_path / "mine.yaml"
    monkeypatch.setenv(P.POLICY_PATH_ENV, f"/nonexistent:{tmp_path}")
    assert P.find_policy("mine") == tmp_path / "mine.yaml"
    assert P.load_policy("mine").name == "mine"


def test_find_policy_names_what_it_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(P.POLICY_PATH_ENV, str(tmp_path))
    with pytest.raises(PolicyError) as info:
        P.find_policy("nosuch")
    message = str(info.value)
    assert str(tmp_path / "nosuch.yaml") in message
    assert str(P.POLICIES_DIR / "nosuch.yaml") in message
    assert info.value.problems[0].location is None
    with pytest.raises(PolicyError, match="neither a policy name nor a path"):
        P.find_policy("bad name!")


def test_include_merges_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_policy(tmp_path, "default: kill\nallow: [getpid]\nerrno: {clone3: ENOSYS}\n", "base.yaml")
    (tmp_path / "lib").mkdir()
    write_policy(tmp_path / "lib", 'allow: ["@timer"]\n', "timers.yaml")
    monkeypatch.setenv(P.POLICY_PATH_ENV, str(tmp_path / "lib"))
    top = write_policy(tmp_path, "include: [base.yaml, timers]\nallow: [read]\n", "top.yaml")
    policy = P.load_policy(str(top))
    assert policy.files == (tmp_path / "base.yaml", tmp_path / "lib" / "timers.yaml", top)
    assert policy.default == P.EPERM  # an included file's default is ignored
    assert {"getpid", "read", "alarm"} <= policy.allowed()
    origin = next(r.origin for r in policy.rules if r.syscall == "getpid")
    assert origin.location is not None and origin.location.file == str(tmp_path / "base.yaml")
    clone3 = next(r for r in policy.rules if r.syscall == "clone3")
    assert str(clone3.action) == "ENOSYS"


def test_diamond_include_is_read_once(tmp_path: Path) -> None:
    write_policy(tmp_path, "allow: [read]\n", "base.yaml")
    write_policy(tmp_path, "include: base.yaml\n", "a.yaml")
    write_policy(tmp_path, "include: base.yaml\n", "b.yaml")
    top = write_policy(tmp_path, "include: [a.yaml, b.yaml]\n", "top.yaml")
    assert len(P.load_policy(str(top)).files) == 4


def test_include_cycle_names_the_chain(tmp_path: Path) -> None:
    write_policy(tmp_path, "include: [b.yaml]\nallow: [read]\n", "a.yaml")
    write_policy(tmp_path, "allow: [write]\ninclude: [c.yaml]\n", "b.yaml")
    write_policy(tmp_path, "include:\n  - a.yaml\n", "c.yaml")
    with pytest.raises(PolicyError) as info:
        P.load_policy(str(tmp_path / "a.yaml"))
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    assert [str(p) for p in info.value.problems] == [
        f"{c}:2:5: include cycle: {a} -> {b} -> {c} -> {a}"
    ]


def test_self_include(tmp_path: Path) -> None:
    found = problems(tmp_path, "include: p.yaml\n")
    assert found == [
        f"{tmp_path / 'p.yaml'}:1:10: include cycle: {tmp_path / 'p.yaml'} -> {tmp_path / 'p.yaml'}"
    ]


def test_problems_of_included_files_are_reported_with_their_file(tmp_path: Path) -> None:
    write_policy(tmp_path, "allow: [nosuch]\n", "base.yaml")
    found = problems(tmp_path, "include: base.yaml\nallow: [alsonot]\n")
    assert [p.split(": ")[0] for p in found] == [
        f"{tmp_path / 'base.yaml'}:1:9",
        f"{tmp_path / 'p.yaml'}:2:9",
    ]


# ---------------------------------------------------------------------------
# Compiling and the cache.


def test_compiled_policy_fields() -> None:
    P.clear_cache()
    compiled = P.compiled("default")
    assert compiled.name == "default"
    assert compiled.source == P.POLICIES_DIR / "default.yaml"
    assert compiled.instructions == len(compiled.bpf) // 8 > 0
    assert compiled.digest == hashlib.sha256(compiled.bpf).hexdigest()
    again = P.compile_policy(P.load_policy("default"))
    assert again.bpf == compiled.bpf  # deterministic
    assert '# filter for syscall "read" (0)' in compiled.pfc()


def test_rules_equal_to_the_default_are_not_emitted(tmp_path: Path) -> None:
    compiled = compile_text(tmp_path, "deny: [getpid]\nallow: [getppid]\n")
    names = set(re.findall(r'# filter for syscall "(\w+)"', compiled.pfc()))
    assert names == {"getppid"}
    killing = compile_text(tmp_path, "default: kill\ndeny: [getpid]\n", "k.yaml")
    assert evaluate(killing.bpf, nr("getpid")) == pyseccomp.ERRNO(errno.EPERM)
    assert evaluate(killing.bpf, nr("getppid")) == pyseccomp.KILL_PROCESS
    logging = compile_text(tmp_path, "default: log\n", "l.yaml")
    assert evaluate(logging.bpf, nr("getpid")) == pyseccomp.LOG
    assert evaluate(logging.bpf, nr("ptrace")) == pyseccomp.ERRNO(errno.EPERM)


def test_cache_until_mtime_changes(tmp_path: Path) -> None:
    base = write_policy(tmp_path, "allow: [read]\n", "base.yaml")
    top = write_policy(tmp_path, "include: base.yaml\nallow: [write]\n", "top.yaml")
    first = P.compiled(str(top))
    assert P.compiled("top.yaml", relative_to=tmp_path) is first
    stat = top.stat()
    os.utime(top, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = P.compiled(str(top))
    assert second is not first and second.digest == first.digest
    assert P.compiled(str(top)) is second
    base.write_text("allow: [read, getpid]\n")
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    third = P.compiled(str(top))
    assert third is not second and "getpid" in third.policy.allowed()


def test_cache_does_not_keep_failures(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "allow: [nosuch]\n")
    with pytest.raises(PolicyError):
        P.compiled(str(path))
    path.write_text("allow: [read]\n")
    assert "read" in P.compiled(str(path)).policy.allowed()


# ---------------------------------------------------------------------------
# Property: the filter allows exactly what the policy lists.

_POOL = sorted(
    n for n in P._KNOWN_NATIVE if n not in UNGROUPED and ALWAYS_DENIED.get(n, None) is None
)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(_POOL), max_size=40), st.sampled_from(["EPERM", "kill", "log"]))
def test_filter_allows_exactly_the_listed_syscalls(
    tmp_path_factory: pytest.TempPathFactory, chosen: set[str], default: str
) -> None:
    directory = tmp_path_factory.mktemp("prop", numbered=True)
    text = f"default: {default}\nallow: [{', '.join(sorted(chosen))}]\n"
    compiled = compile_text(directory, text)
    allowed = chosen - set(ALWAYS_DENIED)
    outright = {name for name, guard in ALWAYS_DENIED.items() if guard is None}
    emitted = set(re.findall(r'# filter for syscall "(\w+)"', compiled.pfc()))
    if default == "EPERM":
        assert emitted == allowed
    else:  # always-denied syscalls get their own EPERM rule
        assert emitted == allowed | outright
    fallback = P.EPERM if default == "EPERM" else P.Action("kill" if default == "kill" else "log")
    for name in _POOL[::7] + sorted(chosen):
        expected = pyseccomp.ALLOW if name in allowed else fallback.seccomp
        if name in ALWAYS_DENIED:
            expected = pyseccomp.ERRNO(errno.EPERM)
        assert evaluate(compiled.bpf, nr(name), (0xFFFF,)) == expected, name
    assert evaluate(compiled.bpf, X32_BIT | 1) == pyseccomp.KILL_PROCESS


# ---------------------------------------------------------------------------
# The tables.


def test_group_members_are_known_to_libseccomp() -> None:
    for group in GROUPS:
        for member, via in expand(group):
            assert P.syscall_number(member) != -1, (member, via)
    for name in ALWAYS_DENIED:
        assert P.syscall_number(name) >= 0, name


def test_every_native_syscall_is_in_a_group() -> None:
    grouped = {member for group in GROUPS for member, _ in expand(group)}
    assert set(P._KNOWN_NATIVE) - grouped - UNGROUPED == set()


def test_constants_match_the_system_headers() -> None:
    import fcntl

    for name, value in CONSTANTS.items():
        for module in (socket, termios, fcntl, os):
            known = getattr(module, name, None)
            if isinstance(known, int) and not name.startswith("PROT_"):
                assert known & P.MASK32 == value & P.MASK32, name


def _documented_groups(text: str) -> Iterator[tuple[str, list[str]]]:
    for match in re.finditer(r"^### `(@[\w-]+)`\n\n.*?\n\n((?:`[\w@-]+` ?)+)$", text, re.M | re.S):
        yield match[1], re.findall(r"`([\w@-]+)`", match[2])


def test_docs_list_every_group() -> None:
    text = (REPO / "docs" / "policies.md").read_text()
    documented = dict(_documented_groups(text))
    assert documented == {name: list(g.members) for name, g in GROUPS.items()}
    for name in ALWAYS_DENIED:
        assert f"`{name}`" in text, name
