"""Tests for supervisor.native: real children, no mocks.

Most children are this interpreter running a snippet (``-I -S -B``: no
site, no user environment, no bytecode writes); where Python itself would
change what is observed (its own signal handlers) the child is /bin/cat.
Every child is reaped with ``waitid(P_PIDFD)`` and its pidfd closed.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pyseccomp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, SpawnError
from supervisor.native import STEPS, Rlimit, SpawnedChild, SpawnRequest, spawn

PY = sys.executable
PYFLAGS = ["-I", "-S", "-B"]
#: Stand-in in ``fds`` lists for the write end of the output pipe.
OUT = -100

#: Prints the sorted list of the child's open fds, without opening any.
LIST_FDS = """
import os, json
fds = []
for fd in range(4096):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
print(json.dumps(fds), flush=True)
"""

LANDLOCK_ACCESS_FS_WRITE_FILE = 1 << 1
SYS_landlock_create_ruleset = 444

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# --- helpers -------------------------------------------------------------


def py(code: str, *args: str | bytes) -> list[str | bytes]:
    """argv running ``code`` in this interpreter."""
    return [PY, *PYFLAGS, "-c", code, *args]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def free_fds(count: int, start: int = 100) -> int:
    """The first of ``count`` consecutive fd numbers, all closed, from ``start``."""
    base = start
    while any(is_open(fd) for fd in range(base, base + count)):
        base += count
    return base


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait(child: SpawnedChild) -> os.waitid_result:
    """Reap ``child`` and close its pidfd."""
    try:
        result = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
    finally:
        os.close(child.pidfd)
    assert result is not None
    return result


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def run(
    argv: Sequence[str | bytes],
    *,
    fds: Sequence[int] | None = None,
    path: str | None = None,
    env: Sequence[str | bytes] = (),
    after_spawn: Callable[[SpawnedChild], None] | None = None,
    **options: object,
) -> tuple[int, bytes]:
    """Spawn, collect stdout+stderr, reap; return (exit code, output).

    ``fds`` defaults to [/dev/null, OUT, OUT]; OUT is the output pipe.
    """
    with ExitStack() as stack:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, null)
        r, w = os.pipe()
        stack.callback(os.close, r)
        if fds is None:
            fds = [null, OUT, OUT]
        request = SpawnRequest(
            path=path or os.fsdecode(argv[0]),
            argv=argv,
            env=env,
            fds=[w if fd == OUT else fd for fd in fds],
            **options,  # type: ignore[arg-type]
        )
        try:
            child = spawn(request)
        finally:
            os.close(w)
        if after_spawn is not None:
            after_spawn(child)
        output = read_all(r)
        result = wait(child)
    assert result.si_code == os.CLD_EXITED, (result, output)
    return result.si_status, output


def run_ok(argv: Sequence[str | bytes], **kwargs: object) -> bytes:
    code, output = run(argv, **kwargs)  # type: ignore[arg-type]
    assert code == 0, output
    return output


def assert_no_zombie() -> None:
    try:
        result = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return  # no children at all
    assert result is None, f"unreaped child: {result}"


def expect_failure(request: SpawnRequest, step: str, *errnos: int) -> SpawnError:
    """Spawning ``request`` fails at ``step`` with one of ``errnos``, leaving
    no fd, zombie or signal-mask change behind."""
    fds_before = open_fds()
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(SpawnError) as info:
        spawn(request)
    assert (info.value.step, errno.errorcode[info.value.errno]) in {
        (step, errno.errorcode[e]) for e in errnos
    }
    assert info.value.program == request.path
    assert open_fds() == fds_before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before
    assert_no_zombie()
    return info.value


def landlock_ruleset(handled_access_fs: int) -> int:
    """A Landlock ruleset fd handling ``handled_access_fs``, with no rules."""
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled_access_fs), 8)
    fd = _libc.syscall(
        ctypes.c_long(SYS_landlock_create_ruleset), attr, ctypes.c_size_t(8), ctypes.c_uint32(0)
    )
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EOPNOTSUPP):
            pytest.skip("Landlock is not available")
        raise OSError(err, os.strerror(err))
    return int(fd)


def seccomp_bpf(build: Callable[[pyseccomp.SyscallFilter], None]) -> bytes:
    """A filter allowing everything but what ``build`` adds, as raw BPF."""
    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    build(flt)
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


@contextmanager
def blocked(signum: int) -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signum])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@pytest.fixture
def null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# --- the module's surface -------------------------------------------------


def test_steps_in_order() -> None:
    assert STEPS == (
        "socketpair",
        "clone",
        "signals",
        "cgroup",
        "fds",
        "chdir",
        "setsid",
        "pdeathsig",
        "rlimits",
        "capabilities",
        "no_new_privs",
        "landlock",
        "seccomp",
        "execve",
    )


def test_spawn_returns_cloexec_pidfd_and_leaks_nothing() -> None:
    before = open_fds()
    pids: list[int] = []

    def check(child: SpawnedChild) -> None:
        pids.append(child.pid)
        assert not os.get_inheritable(child.pidfd)
        assert os.readlink(f"/proc/self/fd/{child.pidfd}") == "anon_inode:[pidfd]"

    out = run_ok(py("import os; print(os.getpid())"), after_spawn=check)
    assert int(out) == pids[0]
    assert open_fds() == before
    assert_no_zombie()


def test_argv_and_env_passed_exactly() -> None:
    code = "import os, sys; print(repr([os.fsencode(a) for a in sys.argv[1:]]))"
    out = run_ok(py(code, "plain", b"bytes\xff", "", "sp ace"))
    assert out.strip() == repr([b"plain", b"bytes\xff", b"", b"sp ace"]).encode()

    env = ["A=1", b"B=\xfe", "EMPTY="]
    assert run_ok(["/usr/bin/env"], env=env) == b"A=1\nB=\xfe\nEMPTY=\n"


def test_path_is_used_not_argv0() -> None:
    out = run_ok(["not-a-path", "-I", "-S", "-c", "import sys; print(sys.argv[0])"], path=PY)
    assert out == b"-c\n"


# --- fds --------------------------------------------------------------------


def test_child_sees_exactly_the_placed_fds(null_fd: int) -> None:
    # Inheritable fds of the parent: close_range must still keep them out.
    r, w = os.pipe()
    extra = os.dup(null_fd)
    try:
        os.set_inheritable(r, True)
        os.set_inheritable(w, True)
        os.set_inheritable(extra, True)
        out = run_ok(py(LIST_FDS), fds=[null_fd, OUT, OUT, extra])
        assert json.loads(out) == [0, 1, 2, 3]
        out = run_ok(py(LIST_FDS), fds=[null_fd, OUT, -1, -1, extra])
        assert json.loads(out) == [0, 1, 4]
        out = run_ok(py(LIST_FDS), fds=[-1, OUT])
        assert json.loads(out) == [1]
    finally:
        for fd in (r, w, extra):
            os.close(fd)


def test_parent_sees_exactly_the_placed_fds(null_fd: int) -> None:
    """/proc/<pid>/fd of a child, read from the parent while the child is
    blocked on stdin: placed fds only, no failure channel, no ruleset."""
    ruleset = landlock_ruleset(LANDLOCK_ACCESS_FS_WRITE_FILE)
    inheritable = os.dup(null_fd)
    os.set_inheritable(inheritable, True)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    # The child says "r" once past startup, then blocks reading stdin.
    code = "import os; os.write(1, b'r'); os.read(0, 1)"
    try:
        try:
            child = spawn(
                SpawnRequest(
                    path=PY,
                    argv=py(code),
                    env=[],
                    fds=[stdin_r, out_w, out_w, -1, inheritable],
                    landlock_ruleset_fd=ruleset,
                )
            )
        finally:
            os.close(stdin_r)
            os.close(out_w)
        assert os.read(out_r, 1) == b"r"
        seen = set(os.listdir(f"/proc/{child.pid}/fd"))
        os.write(stdin_w, b"x")
        assert wait(child).si_status == 0
    finally:
        for fd in (ruleset, inheritable, stdin_w, out_r):
            os.close(fd)
    assert seen == {"0", "1", "2", "4"}


SLOTS = 6

#: Named placements over SLOTS fds at base .. base+SLOTS-1 of the parent,
#: which are also targets in the child: target offset -> source offset.
PLACEMENTS = {
    "identity": {0: 0, 1: 1},
    "swap": {0: 1, 1: 0},
    "rotate": {0: 1, 1: 2, 2: 0},
    "shift": {1: 0, 2: 1, 3: 2},
    "repeat": {0: 1, 2: 1},  # source 1 at two targets; 1 itself left closed
    "repeat-everywhere": dict.fromkeys(range(SLOTS), 3),
    "reverse": {i: SLOTS - 1 - i for i in range(SLOTS)},
}


def check_placement(mapping: dict[int, int]) -> None:
    """Place pipe write ends so that sources and targets are the same fd
    numbers; the child writes each target's number to it; every pipe must
    get exactly the targets that were given its write end."""
    base = free_fds(SLOTS)
    with ExitStack() as stack:
        null = os.open(os.devnull, os.O_RDONLY)
        stack.callback(os.close, null)
        readers: dict[int, int] = {}
        for slot in range(base, base + SLOTS):
            r, w = os.pipe()
            stack.callback(os.close, r)
            os.dup2(w, slot)  # inheritable, to be sure close_range is needed
            os.close(w)
            readers[slot] = r
        try:
            fds = [null, OUT, OUT] + [-1] * (base + SLOTS - 3)
            for target, source in mapping.items():
                fds[base + target] = base + source
            targets = sorted(base + t for t in mapping)
            code = (
                "import os, sys\n"
                "for t in sys.argv[1:]:\n"
                "    os.write(int(t), t.encode() + b'\\n')\n" + LIST_FDS
            )
            out = run_ok(py(code, *map(str, targets)), fds=fds)
        finally:
            for slot in readers:
                os.close(slot)
        assert json.loads(out) == [0, 1, 2, *targets]
        for slot, r in readers.items():
            got = sorted(int(line) for line in read_all(r).split())
            want = sorted(base + t for t, s in mapping.items() if base + s == slot)
            assert got == want, (slot, mapping)


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_fd_placement(name: str) -> None:
    check_placement(PLACEMENTS[name])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, SLOTS - 1)), min_size=SLOTS, max_size=SLOTS))
def test_fd_placement_any(sources: list[int | None]) -> None:
    check_placement({t: s for t, s in enumerate(sources) if s is not None})


def test_closed_stdin_and_shared_stdout_stderr() -> None:
    out = run_ok(py(LIST_FDS + "import os; os.write(2, b'err\\n')"), fds=[-1, OUT, OUT])
    assert out.splitlines() == [b"[1, 2]", b"err"]


# --- failures ---------------------------------------------------------------


def request(**changes: object) -> SpawnRequest:
    base: dict[str, object] = {"path": "/bin/true", "argv": ["true"], "env": [], "fds": [-1]}
    base.update(changes)
    return SpawnRequest(**base)  # type: ignore[arg-type]


def test_fail_execve_enoent() -> None:
    error = expect_failure(request(path="/nonexistent/program"), "execve", errno.ENOENT)
    assert error.exit_code == EXIT_NOT_FOUND
    assert "execve" in str(error) and "/nonexistent/program" in str(error)


def test_fail_execve_eacces(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)  # even root cannot execute a file without an x bit
    error = expect_failure(request(path=str(script)), "execve", errno.EACCES)
    assert error.exit_code == EXIT_CANNOT_EXECUTE
    expect_failure(request(path=str(tmp_path)), "execve", errno.EACCES)


def test_fail_chdir(tmp_path: Path) -> None:
    expect_failure(request(cwd=str(tmp_path / "missing")), "chdir", errno.ENOENT)


def test_fail_fds_bad_source() -> None:
    closed = free_fds(1, 300)
    expect_failure(request(fds=[-1, closed]), "fds", errno.EBADF)


def test_fail_landlock_bad_fd() -> None:
    closed = free_fds(1, 300)
    expect_failure(request(landlock_ruleset_fd=closed), "landlock", errno.EBADF)
    r, w = os.pipe()
    try:
        # An open fd that is not a ruleset.
        expect_failure(request(landlock_ruleset_fd=r), "landlock", errno.EBADFD, errno.EBADF)
    finally:
        os.close(r)
        os.close(w)


def test_fail_seccomp_garbage() -> None:
    expect_failure(request(seccomp_bpf=b"\xff" * 8), "seccomp", errno.EINVAL)
    # Well-formed instructions that do not end in a return are rejected too.
    ld_only = struct.pack("=HBBI", 0x20, 0, 0, 0)  # BPF_LD|BPF_W|BPF_ABS 0
    expect_failure(request(seccomp_bpf=ld_only), "seccomp", errno.EINVAL)


def test_fail_rlimits_soft_above_hard() -> None:
    limits = [Rlimit(resource.RLIMIT_NOFILE, 100, 50)]
    expect_failure(request(rlimits=limits), "rlimits", errno.EINVAL)


def test_seccomp_denying_execve_is_reported_as_execve() -> None:
    bpf = seccomp_bpf(lambda f: f.add_rule(pyseccomp.ERRNO(errno.EPERM), "execve"))
    expect_failure(request(seccomp_bpf=bpf), "execve", errno.EPERM)


def test_seccomp_killing_execve_shows_in_exit_status() -> None:
    """A filter that kills at execve leaves no report: spawn succeeds and the
    child is found killed by SIGSYS."""
    bpf = seccomp_bpf(lambda f: f.add_rule(pyseccomp.KILL_PROCESS, "execve"))
    child = spawn(request(seccomp_bpf=bpf))
    result = wait(child)
    assert (result.si_code, result.si_status) == (os.CLD_KILLED, signal.SIGSYS)


@pytest.mark.parametrize(
    "changes",
    [
        {"path": "/bin/\0true"},
        {"argv": []},
        {"argv": ["true", "a\0b"]},
        {"argv": ["true", b"a\0b"]},
        {"env": ["A=\0"]},
        {"cwd": "/\0"},
        {"fds": [-2]},
        {"fds": [2**31]},
        {"landlock_ruleset_fd": -5},
        {"rlimits": [Rlimit(resource.RLIMIT_CORE, -5, 0)]},
        {"rlimits": [Rlimit(resource.RLIMIT_CORE, 0, 2**64)]},
        {"seccomp_bpf": b""},
        {"seccomp_bpf": b"\0" * 7},
        {"seccomp_bpf": b"\0" * 8 * 4097},
    ],
)
def test_invalid_requests(changes: dict[str, object]) -> None:
    before = open_fds()
    with pytest.raises(ValueError):
        spawn(request(**changes))
    assert open_fds() == before
    assert_no_zombie()


# --- the steps take effect --------------------------------------------------


def test_rlimits_applied() -> None:
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    core_hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    hard = min(128, nofile_hard) if nofile_hard != resource.RLIM_INFINITY else 128
    limits = [
        Rlimit(resource.RLIMIT_NOFILE, hard // 2, hard),
        Rlimit(resource.RLIMIT_CORE, 0, core_hard),  # often RLIM_INFINITY
    ]
    code = (
        "import resource\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = run_ok(py(code), rlimits=limits)
    assert out.decode().splitlines() == [str((hard // 2, hard)), str((0, core_hard))]


def test_new_session() -> None:
    code = "import os; print(os.getpid(), os.getsid(0), os.getpgrp())"
    pids: list[int] = []
    out = run_ok(py(code), after_spawn=lambda c: pids.append(c.pid))
    assert out.split() == [str(pids[0]).encode()] * 3

    out = run_ok(py(code), new_session=False)
    pid, sid, _ = map(int, out.split())
    assert sid == os.getsid(0) != pid


def test_cwd(tmp_path: Path) -> None:
    assert (
        run_ok(py("import os; print(os.getcwd())"), cwd=str(tmp_path)) == f"{tmp_path}\n".encode()
    )
    assert run_ok(py("import os; print(os.getcwd())")) == f"{os.getcwd()}\n".encode()


def status_fields(output: bytes) -> dict[str, str]:
    fields = {}
    for line in output.decode().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_no_new_privs_always_set() -> None:
    assert status_fields(run_ok(["/bin/cat", "/proc/self/status"]))["NoNewPrivs"] == "1"


def test_signals_reset_and_unblocked() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; add a handler, an ignored signal
    and a blocked one: the child (cat, which sets no handlers) has none."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    old_usr2 = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with blocked(signal.SIGWINCH):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            out = run_ok(["/bin/cat", "/proc/self/status"])
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # restored
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        signal.signal(signal.SIGUSR2, old_usr2)
    fields = status_fields(out)
    assert fields["SigIgn"] == "0" * 16
    assert fields["SigBlk"] == "0" * 16
    assert fields["SigCgt"] == "0" * 16


def test_seccomp_filter_installed() -> None:
    """getppid never fails, so EPERM from it is the filter's doing."""
    bpf = seccomp_bpf(lambda f: f.add_rule(pyseccomp.ERRNO(errno.EPERM), "getppid"))
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "getppid")
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(int(sys.argv[1])), ctypes.get_errno())\n"
    )
    out = run_ok(py(code, str(nr)), seccomp_bpf=bpf)
    assert out.split() == [b"-1", str(errno.EPERM).encode()]
    out = run_ok(py(code, str(nr)))
    assert out.split() == [str(os.getpid()).encode(), b"0"]


def test_landlock_ruleset_enforced(tmp_path: Path) -> None:
    """A ruleset handling only WRITE_FILE (the loader needs no write) with no
    rules: the child can still read the file but no longer open it to write."""
    target = tmp_path / "file"
    target.write_text("content")
    code = (
        "import sys\n"
        "print(open(sys.argv[1]).read())\n"
        "try:\n"
        "    open(sys.argv[1], 'a')\n"
        "except PermissionError as e:\n"
        "    print('denied', e.errno)\n"
        "else:\n"
        "    print('allowed')\n"
    )
    assert run_ok(py(code, str(target))).split() == [b"content", b"allowed"]
    ruleset = landlock_ruleset(LANDLOCK_ACCESS_FS_WRITE_FILE)
    try:
        out = run_ok(py(code, str(target)), landlock_ruleset_fd=ruleset)
        assert is_open(ruleset)  # the caller keeps its fd
        # The ruleset fd is gone in the child after restrict_self.
        assert json.loads(run_ok(py(LIST_FDS), landlock_ruleset_fd=ruleset)) == [0, 1, 2]
    finally:
        os.close(ruleset)
    assert out.split() == [b"content", b"denied", str(errno.EACCES).encode()]


# --- concurrency --------------------------------------------------------------


def test_concurrent_spawns() -> None:
    """Several threads spawning at once: each child sees only its own fds,
    although the other threads' pipes (inheritable here) and failure
    channels exist in the parent while it is cloned."""

    def one(_: int) -> list[int]:
        results = []
        for _ in range(3):
            r, w = os.pipe()
            os.set_inheritable(r, True)
            os.set_inheritable(w, True)
            try:
                child = spawn(SpawnRequest(path=PY, argv=py(LIST_FDS), env=[], fds=[-1, w, w]))
            finally:
                os.close(w)
            try:
                out = read_all(r)
            finally:
                os.close(r)
            assert wait(child).si_status == 0
            results.append(json.loads(out))
        return results

    before = open_fds()
    with ThreadPoolExecutor(max_workers=8) as pool:
        all_results = [fds for result in pool.map(one, range(8)) for fds in result]
    assert all_results == [[1, 2]] * 24
    assert open_fds() == before
    assert_no_zombie()


def test_concurrent_spawns_with_failures() -> None:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            for i in range(20):
                if i % 2:
                    with pytest.raises(SpawnError):
                        spawn(request(path="/nonexistent"))
                else:
                    assert wait(spawn(request())).si_status == 0
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_no_zombie()


# -- rebuilding the extension under a running supervisor ----------------------

_USE_EXTENSION = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_native", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
name = lambda step: native.ffi.string(native.lib.cv_step_name(step)).decode()
print(name(0), flush=True)
sys.stdin.readline()  # the test swaps the file now
print(" ".join(name(step) for step in range(native.lib.CV_STEP_COUNT)), flush=True)
"""


@pytest.mark.parametrize("swap", ["install", "rewrite in place"])
def test_rebuilding_the_extension_spares_running_processes(tmp_path: Path, swap: str) -> None:
    """native/build.py installs by rename: a process that has the old build
    mapped keeps running. Rewriting the file in place (the control) puts the
    new bytes under the running process, here int3 instructions."""
    spec = importlib.util.spec_from_file_location(
        "capvisor_native_build", Path(__file__).parent.parent / "native" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    import supervisor._native as native

    target = tmp_path / "_native.abi3.so"
    shutil.copyfile(native.__file__, target)
    new_build = tmp_path / "new-build.so"
    new_build.write_bytes(b"\xcc" * target.stat().st_size)
    proc = subprocess.Popen(
        [sys.executable, "-c", _USE_EXTENSION, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "socketpair\n"
    if swap == "install":
        build.install(new_build, target)
    else:
        shutil.copyfile(new_build, target)
    out, _ = proc.communicate("go\n", timeout=30)
    assert target.read_bytes() == new_build.read_bytes()
    if swap == "install":
        assert proc.returncode == 0 and out.split() == list(STEPS)
    else:
        assert proc.returncode < 0  # killed by SIGTRAP (or SIGSEGV/SIGILL)
