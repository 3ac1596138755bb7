"""Confinement, proven by real children attempting the forbidden thing.

Each test runs `capvisor run` (as root and as an unprivileged user, see
conftest.py) on a description whose program tries something, and checks
both that the allowed thing works and that the forbidden one fails with the
error the responsible layer gives (Landlock: EACCES/EPERM, seccomp: EPERM or
SIGSYS). Targets are throwaway: files in a fresh directory, processes the
test started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import PYTHON, Capvisor
from .cri_log import records, stream_bytes


def py(code: str) -> str:
    """A description fragment running ``code`` under the test's Python."""
    return f"program: {PYTHON}\nargs:\n  - -c\n  - {json.dumps(textwrap.dedent(code))}\n"


def out(result: object) -> str:
    return stream_bytes(result.stdout, "stdout").decode()  # type: ignore[attr-defined]


def err(result: object) -> str:
    return stream_bytes(result.stdout, "stderr").decode()  # type: ignore[attr-defined]


def test_reading_outside_capabilities_fails(capvisor: Capvisor, work: Path) -> None:
    secret = work / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o644)
    desc = capvisor.describe(
        py(
            f"""
            import errno
            for path in ({str(secret)!r}, "/etc/passwd", {str(work)!r}):
                try:
                    open(path).read()
                    print("read", path)
                except OSError as e:
                    print(errno.errorcode[e.errno], path)
            """
        )
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == [
        f"EACCES {secret}",
        "EACCES /etc/passwd",
        f"EACCES {work}",
    ]


def test_granted_file_read_and_write(capvisor: Capvisor, work: Path) -> None:
    (work / "in.txt").write_text("input data")
    (work / "in.txt").chmod(0o644)
    capvisor.user.own(work)
    desc = capvisor.describe(
        py(
            """
            import os
            print(os.read(3, 100).decode())
            os.write(4, b"written through fd 4")
            """
        )
        + "fds:\n"
        + "  input: !file {path: in.txt}\n"
        + "  output: !file {path: out.txt, mode: w, create: true}\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert out(result) == "input data\n"
    assert (work / "out.txt").read_text() == "written through fd 4"


def test_read_only_mount(capvisor: Capvisor, work: Path) -> None:
    data = work / "data"
    data.mkdir()
    (data / "file.txt").write_text("mounted")
    (data / "sub").mkdir()
    for path in (data, data / "sub"):
        path.chmod(0o777)
    (data / "file.txt").chmod(0o666)
    (work / "outside.txt").write_text("outside")
    (work / "outside.txt").chmod(0o666)
    desc = capvisor.describe(
        py(
            """
            import errno, os
            def attempt(what, fn):
                try:
                    fn()
                    print(what, "ok")
                except OSError as e:
                    print(what, errno.errorcode[e.errno])
            def read(name):
                fd = os.open(name, os.O_RDONLY, dir_fd=3)
                print(os.read(fd, 100).decode())
            attempt("read", lambda: read("file.txt"))
            attempt("list", lambda: print(sorted(os.listdir(3))))
            attempt("write", lambda: os.open("file.txt", os.O_WRONLY, dir_fd=3))
            attempt("create", lambda: os.open("new.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=3))
            attempt("mkdir", lambda: os.mkdir("newdir", dir_fd=3))
            attempt("unlink", lambda: os.unlink("file.txt", dir_fd=3))
            attempt("rmdir", lambda: os.rmdir("sub", dir_fd=3))
            attempt("rename", lambda: os.rename("file.txt", "moved.txt", src_dir_fd=3, dst_dir_fd=3))
            attempt("dotdot", lambda: os.open("../outside.txt", os.O_RDONLY, dir_fd=3))
            attempt("dotdot-dir", lambda: os.listdir(os.open("..", os.O_RDONLY, dir_fd=3)))
            """
        )
        + "fds:\n  data: !mount {path: data, mode: ro}\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == [
        "mounted",
        "read ok",
        "['file.txt', 'sub']",
        "list ok",
        "write EACCES",
        "create EACCES",
        "mkdir EACCES",
        "unlink EACCES",
        "rmdir EACCES",
        "rename EACCES",
        "dotdot EACCES",
        "dotdot-dir EACCES",
    ]
    assert sorted(os.listdir(data)) == ["file.txt", "sub"]
    assert (data / "file.txt").read_text() == "mounted"


def test_read_write_mount(capvisor: Capvisor, work: Path) -> None:
    data = work / "data"
    data.mkdir()
    capvisor.user.own(data)
    desc = capvisor.describe(
        py(
            """
            import os
            fd = os.open("new.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=3)
            os.write(fd, b"created")
            os.mkdir("d", dir_fd=3)
            os.rename("new.txt", "d/moved.txt", src_dir_fd=3, dst_dir_fd=3)
            print(sorted(os.listdir(3)))
            """
        )
        + "fds:\n  data: !mount {path: data, mode: rw}\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert (data / "d" / "moved.txt").read_text() == "created"


def test_only_granted_fds_exist(capvisor: Capvisor, work: Path) -> None:
    (work / "f.txt").write_text("x")
    (work / "f.txt").chmod(0o644)
    # An fd capvisor holds (inherited, not CLOEXEC) but does not grant.
    leaked_r, leaked_w = os.pipe()
    desc = capvisor.describe(
        py(
            """
            import os, sys
            fds = []
            for fd in range(4096):
                try:
                    os.fstat(fd)
                    fds.append(fd)
                except OSError:
                    pass
            print(fds)
            sys.stdout.flush()
            os.read(0, 1)  # hold still while the test looks at /proc/PID/fd
            """
        )
        + "stdin: !fd stdin\n"
        + "fds:\n  a: !file {path: f.txt}\n  b: !file {path: f.txt}\n"
    )
    proc = capvisor.popen(
        desc,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(leaked_r, leaked_w),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()  # the program has exec'd and is now blocked on stdin
        child_pid = _child_of(proc.pid)
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{child_pid}/fd")) == [0, 1, 2, 3, 4]
        rest, stderr = proc.communicate(input=b"x", timeout=30)
        stdout = first + rest
    finally:
        proc.kill()
        os.close(leaked_r)
        os.close(leaked_w)
    assert proc.returncode == 0, stderr
    assert stream_bytes(stdout, "stdout") == b"[0, 1, 2, 3, 4]\n"


def _child_of(parent: int) -> int:
    """The pid of ``parent``'s only child process (capvisor's program)."""
    children = []
    for task in os.listdir(f"/proc/{parent}/task"):
        children += Path(f"/proc/{parent}/task/{task}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_listen_fds_names_and_pid(capvisor: Capvisor, work: Path) -> None:
    (work / "f.txt").write_text("x")
    (work / "f.txt").chmod(0o644)
    desc = capvisor.describe(
        py(
            """
            import os, sys
            print(os.environ["LISTEN_FDS"], os.environ["LISTEN_FDNAMES"])
            print(os.environ["LISTEN_PID"] == str(os.getpid()))
            print(sys.argv[1:], os.environ["MY_FD"])
            """
        )
        + "  - !file {path: f.txt}\n"
        + "env: {MY_FD: !file {path: f.txt}}\n"
        + "fds:\n  config: !file {path: f.txt}\n  data.v2: !file {path: f.txt}\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == [
        "4 config:data.v2:args.2:env.MY_FD",
        "True",
        "['5'] 6",
    ]


def test_abstract_unix_socket_unreachable(capvisor: Capvisor, work: Path) -> None:
    name = f"capvisor-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen()
        listener.setblocking(False)
        desc = capvisor.describe(
            py(
                f"""
                import errno, socket
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect("\\0{name}")
                    print("connected")
                except OSError as e:
                    print(errno.errorcode[e.errno])
                """
            )
        )
        result = capvisor.run(desc)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 0, result.stderr
    assert out(result) == "EPERM\n"


def test_signals_to_others_fail(capvisor: Capvisor) -> None:
    target = subprocess.Popen(["sleep", "60"])
    try:
        desc = capvisor.describe(
            py(
                f"""
                import errno, os, signal
                for pid in (os.getppid(), {target.pid}):
                    try:
                        os.kill(pid, signal.SIGTERM)
                        print("killed")
                    except OSError as e:
                        print(errno.errorcode[e.errno])
                os.kill(os.getpid(), 0)
                print("self ok")
                """
            )
        )
        result = capvisor.run(desc)
        assert target.poll() is None, "the throwaway target was killed"
    finally:
        target.kill()
        target.wait()
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == ["EPERM", "EPERM", "self ok"]


SYSCALL_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Each call gets arguments that make it fail harmlessly if it is allowed
   (EBADF, EFAULT, EINVAL), so EPERM can only come from the filter. */
static void probe(const char *name, long nr, long a, long b, long c) {
    long r = syscall(nr, a, b, c, 0, 0, 0);
    printf("%s %s\n", name, r == -1 ? strerrorname_np(errno) : "ok");
}

int main(void) {
    probe("read", SYS_read, -1, 0, 0);                  /* allowed: EBADF */
    probe("mount", SYS_mount, 0, 0, 0);                 /* denied */
    probe("ptrace", SYS_ptrace, 0x4206, 0, 0);          /* denied */
    probe("socket", SYS_socket, 2, 1, 0);               /* denied */
    probe("bpf", SYS_bpf, -1, 0, 0);                    /* denied */
    probe("clone3", SYS_clone3, 0, 0, 0);               /* ENOSYS: libc falls back */
    fflush(stdout);
    return 0;
}
"""


def test_syscalls_outside_policy_fail_with_eperm(capvisor: Capvisor, cc) -> None:  # type: ignore[no-untyped-def]
    probe = cc("probe", SYSCALL_PROBE)
    result = capvisor.run(capvisor.describe(f"program: {probe}\n"))
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == [
        "read EBADF",
        "mount EPERM",
        "ptrace EPERM",
        "socket EPERM",
        "bpf EPERM",
        "clone3 ENOSYS",
    ]


INT80 = r"""
#include <stdio.h>
int main(void) {
    long ret;
    puts("before");
    fflush(stdout);
    /* i386 getpid (20) through the 32-bit entry point. */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20) : "memory");
    printf("after: %ld\n", ret);
    return 0;
}
"""


def test_foreign_architecture_syscall_kills(capvisor: Capvisor, cc) -> None:  # type: ignore[no-untyped-def]
    binary = cc("int80", INT80)
    result = capvisor.run(capvisor.describe(f"program: {binary}\n"))
    assert result.returncode == 128 + signal.SIGSYS, (result.returncode, result.stderr)
    assert out(result) == "before\n"


EUID = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"""


def test_setuid_binary_gains_nothing(capvisor: Capvisor, cc, work: Path) -> None:  # type: ignore[no-untyped-def]
    if capvisor.user.uid is None:
        pytest.skip("needs root to make a setuid-root binary and an unprivileged caller")
    binary = work / "euid"
    binary.write_bytes(cc("euid", EUID).read_bytes())
    os.chown(binary, 0, 0)
    binary.chmod(0o4755)
    control = subprocess.run([*capvisor.user.prefix(), str(binary)], capture_output=True, text=True)
    if control.stdout != "euid=0\n":
        pytest.skip(f"setuid does not take effect on {work} (nosuid?): {control.stdout!r}")
    result = capvisor.run(capvisor.describe(f"program: {binary}\n"))
    assert result.returncode == 0, result.stderr
    assert out(result) == f"euid={capvisor.user.uid}\n"


def test_rlimits_apply(capvisor: Capvisor, work: Path) -> None:
    capvisor.user.own(work)
    desc = capvisor.describe(
        py(
            """
            import errno, os, resource, signal
            print(resource.getrlimit(resource.RLIMIT_NOFILE))
            print(resource.getrlimit(resource.RLIMIT_FSIZE))
            print(resource.getrlimit(resource.RLIMIT_CPU))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            try:
                while True:
                    os.write(3, b"x" * 1000)
            except OSError as e:
                print(errno.errorcode[e.errno])
            try:
                [os.dup(0) for _ in range(100)]
            except OSError as e:
                print(errno.errorcode[e.errno])
            """
        )
        + "fds:\n  out: !file {path: big.txt, mode: w, create: true}\n"
        + "limits: {nofile: 32, fsize: 4K, cpu: 1m}\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    assert out(result).splitlines() == ["(32, 32)", "(4096, 4096)", "(60, 60)", "EFBIG", "EMFILE"]
    assert (work / "big.txt").stat().st_size == 4096


def test_cgroup_limits_fail_closed_under_run(capvisor: Capvisor, work: Path) -> None:
    # `run` makes no cgroup: limits.pids would not bind, so it refuses unless degraded.
    strict = "program: /bin/echo\nargs: [ran]\nlimits: {pids: 8}\n"
    desc = capvisor.describe(strict)
    result = capvisor.run(desc)
    assert result.returncode == 125
    assert f"{desc}:3:1: limits.pids: not applied" in result.stderr
    assert "degrade: allow" in result.stderr
    assert b"ran" not in result.stdout

    result = capvisor.run(capvisor.describe("degrade: allow\n" + strict, "allowed.yaml"))
    assert result.returncode == 0, result.stderr
    assert "limits.pids: not applied" in result.stderr
    assert out(result) == "ran\n"


def test_report_shows_effective_confinement(capvisor: Capvisor, work: Path) -> None:
    data = work / "data"
    data.mkdir()
    desc = capvisor.describe(
        "program: /bin/true\nfds:\n  data: !mount {path: data}\nlimits: {nofile: 64}\n"
    )
    result = capvisor.run(desc, "--report")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["landlock"]["abi"] >= 1
    assert [f["name"] for f in report["fds"]] == ["stdin", "stdout", "stderr", "data"]
    assert report["seccomp"]["policy"] == "default"
    assert len(report["seccomp"]["digest"]) == 64 and report["seccomp"]["instructions"] > 0
    assert report["limits"] == {"nofile": 64}
    assert report["no_new_privs"] is True
    paths = json.dumps(report["landlock"])
    assert str(data) in paths
    assert "/bin/true" in paths or "/usr/bin/true" in paths
    for forbidden in ('"/etc"', '"/home"', '"/root"', '"/tmp"', '"/proc"'):
        assert forbidden not in paths


def test_stdout_and_stderr_go_to_the_log_in_cri_format(capvisor: Capvisor) -> None:
    desc = capvisor.describe(
        "program: /bin/sh\nargs: [-c, 'echo out1; echo err1 >&2; printf tail']\n"
    )
    result = capvisor.run(desc)
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    assert {(r.stream, r.tag, r.content) for r in recs} == {
        ("stdout", "F", b"out1"),
        ("stderr", "F", b"err1"),
        ("stdout", "P", b"tail"),
    }


def test_exit_codes_pass_through(capvisor: Capvisor) -> None:
    assert (
        capvisor.run(capvisor.describe("program: /bin/sh\nargs: [-c, 'exit 7']\n")).returncode == 7
    )
    killed = capvisor.run(capvisor.describe("program: /bin/sh\nargs: [-c, 'kill -KILL $$']\n"))
    assert killed.returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_then_kill(capvisor: Capvisor, work: Path, signum: int) -> None:
    desc = capvisor.describe(
        "program: /bin/sh\n"
        "args: [-c, 'trap \"echo got TERM\" TERM; echo ready; while :; do sleep 0.05; done']\n"
        "runtime: [/bin/sleep]\n"
        "stop: {signal: TERM, timeout: 1s}\n"
    )
    capvisor.user.own(work)
    log = work / "log"
    proc = capvisor.popen(desc, "--log", str(log), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in (log.read_bytes() if log.exists() else b""):
            assert time.monotonic() < deadline, "program never started"
            time.sleep(0.02)
        started = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert 0.9 <= elapsed < 10
    assert b"got TERM" in stream_bytes(log.read_bytes(), "stdout")


def test_missing_and_non_executable_programs(capvisor: Capvisor, work: Path) -> None:
    missing = capvisor.run(capvisor.describe("program: /nonexistent/prog\n"))
    assert missing.returncode == 127
    assert missing.stderr.strip() == (
        f"capvisor: {work}/prog.yaml:1:1: program /nonexistent/prog: No such file or directory"
    )
    plain = work / "plain"
    plain.write_text("not a program")
    plain.chmod(0o644)
    not_exec = capvisor.run(capvisor.describe(f"program: {plain}\n"))
    assert not_exec.returncode == 126
    assert not_exec.stderr.strip().endswith(f"program {plain}: not executable")
    directory = capvisor.run(capvisor.describe(f"program: {work}\n"))
    assert directory.returncode == 126
    assert directory.stderr.strip().endswith("not a regular file")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("program: /bin/true\nfds: {x: !mnt {path: /}}\n", "prog.yaml:2:10: unknown tag !mnt (did you mean !mount?)"),
        ("program: /bin/true\nfds: {x: !file {path: /nonexistent/x}}\n", "prog.yaml:2:10: !file: /nonexistent/x: No such file or directory"),
        ("program: /bin/true\nfds: {x: !mount {path: /nonexistent}}\n", "prog.yaml:2:10: !mount: /nonexistent: No such file or directory"),
        ("program: /bin/true\nfds: {x: !socket {connect: 'unix:/nonexistent.sock'}}\n", "prog.yaml:2:10: !socket: unix:/nonexistent.sock: No such file or directory"),
        ("program: /bin/true\nfds: {x: !fd 77}\n", "prog.yaml:2:10: !fd 77: not open in capvisor"),
        ("program: /bin/true\nfds: {x: !server {a: b}}\n", "prog.yaml:2:10: !server needs a switchboard; this supervisor was started without one"),
        ("program: /bin/true\npolicy: nonexistent-policy\n", "nonexistent-policy"),
        ("program: /bin/true\nruntime: [/nonexistent/lib]\n", "/nonexistent/lib"),
        ("program: [\n", "prog.yaml:2:1: invalid YAML"),
    ],
)  # fmt: skip
def test_bad_descriptions_give_one_clear_error(
    capvisor: Capvisor, work: Path, text: str, message: str
) -> None:
    result = capvisor.run(capvisor.describe(text))
    assert result.returncode == 125, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == b""


def test_unwritable_log_is_a_clear_error(capvisor: Capvisor, work: Path) -> None:
    result = capvisor.run(
        capvisor.describe("program: /bin/true\n"), "--log", "/nonexistent/dir/log"
    )
    assert result.returncode == 125
    assert result.stderr == "capvisor: --log /nonexistent/dir/log: No such file or directory\n"


def test_log_reader_going_away_does_not_stop_supervision(capvisor: Capvisor, work: Path) -> None:
    """`capvisor run … | head -1`: EPIPE on the log is reported once; the program runs to its end."""
    capvisor.user.own(work)
    desc = capvisor.describe(
        "program: /bin/sh\n"
        "args: [-c, 'echo first; sleep 0.3; i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; "
        "echo finished >&2; exit 3']\n"
        "runtime: [/bin/sleep]\n"
    )
    proc = capvisor.popen(desc, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert b"stdout F first" in proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 3
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert stderr.count("writing the log to standard output failed: Broken pipe") == 1


def test_hello_example(capvisor: Capvisor) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "hello.yaml"
    mode = example.parent.stat().st_mode
    if capvisor.user.uid is not None and not mode & stat.S_IXOTH:
        pytest.skip(f"{example.parent} is not reachable by uid {capvisor.user.uid}")
    result = capvisor.run(example)
    assert result.returncode == 0, result.stderr
    text = out(result)
    assert "hello from capvisor" in text
    assert "/etc/passwd: Permission denied" in err(result)
