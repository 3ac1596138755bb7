"""Reaching other processes: signals, ptrace, their memory, privilege through exec.

Targets are the supervisor itself (the program's parent) and a throwaway
``sleep`` the test starts; after every attack both must still be alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Hostile
from .harness import attack


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A throwaway process outside the sandbox, in a process group of its own."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@attack(
    "kill/tgkill/pidfd_send_signal to the supervisor and to other processes",
    "Landlock signal scope",
)
def test_signals_to_supervisor_and_others(
    hostile: Hostile, bystander: subprocess.Popen[bytes]
) -> None:
    prog = hostile.c(
        "signals",
        """
        #include <sys/syscall.h>
        static void attack(const char *who, int pid) {
            char name[64];
            snprintf(name, sizeof name, "kill-%s", who);
            TRY(name, kill(pid, SIGKILL));
            snprintf(name, sizeof name, "tgkill-%s", who);
            TRY(name, syscall(SYS_tgkill, pid, pid, SIGKILL));
            snprintf(name, sizeof name, "sigqueue-%s", who);
            TRY(name, sigqueue(pid, SIGKILL, (union sigval){0}));
            int pidfd = syscall(SYS_pidfd_open, pid, 0);
            snprintf(name, sizeof name, "pidfd-%s", who);
            TRY(name, syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0));
        }
        int main(int argc, char **argv) {
            attack("supervisor", getppid());
            attack("bystander", atoi(argv[1]));
            /* The bystander leads its own group (the supervisor's is the test runner's). */
            TRY("pgrp-bystander", kill(-atoi(argv[1]), SIGKILL));
            TRY("self", kill(getpid(), 0));
            pid_t kid = fork();
            if (kid == 0) { pause(); _exit(0); }
            TRY("own-child", kill(kid, SIGKILL));
            waitpid(kid, NULL, 0);
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(bystander.pid))
    assert bystander.poll() is None, "the bystander was killed"
    expected = [
        f"{what}-{who} EPERM"
        for who in ("supervisor", "bystander")
        for what in ("kill", "tgkill", "sigqueue", "pidfd")
    ]
    assert out.lines == [*expected, "pgrp-bystander EPERM", "self ok", "own-child ok", "done"]


@attack("ptrace and process_vm_readv of the supervisor", "seccomp (always denied)")
def test_ptrace_and_memory_of_the_supervisor(hostile: Hostile) -> None:
    prog = hostile.c(
        "ptrace",
        """
        #include <sys/ptrace.h>
        #include <sys/uio.h>
        int main(void) {
            int ppid = getppid();
            char buf[16];
            struct iovec local = {buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
            TRY("attach", ptrace(PTRACE_ATTACH, ppid, 0, 0));
            TRY("seize", ptrace(PTRACE_SEIZE, ppid, 0, 0));
            TRY("traceme", ptrace(PTRACE_TRACEME, 0, 0, 0));
            /* Allowed, these would be ESRCH (no such process): EPERM is the filter. */
            TRY("attach-nobody", ptrace(PTRACE_ATTACH, -1, 0, 0));
            TRY("vm-readv", process_vm_readv(ppid, &local, 1, &remote, 1, 0));
            TRY("vm-readv-nobody", process_vm_readv(-1, &local, 1, &remote, 1, 0));
            TRY("vm-writev", process_vm_writev(ppid, &local, 1, &remote, 1, 0));
            int pidfd = syscall(SYS_pidfd_open, ppid, 0);
            TRY("pidfd-getfd", syscall(SYS_pidfd_getfd, pidfd, 0, 0));
            char path[64];
            snprintf(path, sizeof path, "/proc/%d/mem", ppid);
            TRY("proc-mem", open(path, O_RDONLY));
            DONE();
        }
        """,
    )
    out = hostile.run(prog)
    assert out.lines == [
        "attach EPERM",
        "seize EPERM",
        "traceme EPERM",
        "attach-nobody EPERM",
        "vm-readv EPERM",
        "vm-readv-nobody EPERM",
        "vm-writev EPERM",
        "pidfd-getfd EPERM",
        "proc-mem EACCES",  # Landlock
        "done",
    ]


EUID = """
int main(void) {
    printf("euid=%d\\n", (int)geteuid());
    fflush(stdout);
    return 0;
}
"""


@attack("execve of a setuid-root binary", "no_new_privs")
def test_setuid_binary_gains_nothing(hostile: Hostile) -> None:
    if hostile.user.uid is None:
        pytest.skip("needs root to make a setuid-root binary and an unprivileged supervisor")
    binary = hostile.work / "euid"
    binary.write_bytes(hostile.c("euid", EUID).read_bytes())
    os.chown(binary, 0, 0)
    binary.chmod(0o4755)
    control = subprocess.run([*hostile.user.prefix(), str(binary)], capture_output=True, text=True)
    if control.stdout != "euid=0\n":
        pytest.skip(f"setuid does not take effect in {hostile.work} (nosuid?)")
    prog = hostile.c(
        "exec_setuid",
        """
        #include <sys/prctl.h>
        int main(int argc, char **argv) {
            printf("nnp=%d\\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
            fflush(stdout);
            char *args[] = {argv[1], NULL};
            execve(argv[1], args, NULL);
            return 99;
        }
        """,
    )
    out = hostile.run(prog, str(binary), extra=f"runtime: [{binary}]\n")
    assert out.lines == ["nnp=1", f"euid={hostile.user.uid}"]


@attack(
    "raise its own rlimits back (as root), keep root's capabilities",
    "capabilities dropped in the child (as root too); the kernel",
)
def test_rlimits_cannot_be_raised(hostile: Hostile) -> None:
    prog = hostile.c(
        "raise_limits",
        """
        #include <linux/capability.h>
        #include <sys/resource.h>
        int main(void) {
            /* prlimit64 on itself (pid 0) is what the policy allows: glibc's
               getrlimit and setrlimit use it. */
            struct rlimit big = {1 << 20, 1 << 20}, huge = {RLIM_INFINITY, RLIM_INFINITY};
            TRY("raise-nofile", syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, &big, NULL));
            TRY("raise-as", syscall(SYS_prlimit64, 0, RLIMIT_AS, &huge, NULL));
            struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
            struct __user_cap_data_struct caps[2];
            syscall(SYS_capget, &head, caps);
            printf("effective-caps %s\\n", caps[0].effective || caps[1].effective ? "some" : "none");
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra="limits: {nofile: 64, as: 1G}\n")
    assert out.lines[-1] == "done"
    assert out.lines[:-1] == ["raise-nofile EPERM", "raise-as EPERM", "effective-caps none"], (
        f"HOLE: a program confined by a root supervisor keeps root's capabilities and so "
        f"can lift its limits (CAP_SYS_RESOURCE): {out.lines}. Fix in native/spawn.c, "
        "before no_new_privs: drop every capability from the bounding set (PR_CAPBSET_DROP), "
        "clear the ambient set, capset() to empty, and lock SECBIT_NOROOT"
    )


@attack(
    "the same escapes from an interpreter (Python, its library tree granted)",
    "Landlock; seccomp",
)
def test_escapes_from_python(hostile: Hostile, bystander: subprocess.Popen[bytes]) -> None:
    secret = hostile.work / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o644)
    out = hostile.python(
        f"""
        import ctypes, errno, os, socket, sys
        def attempt(name, fn):
            try:
                fn()
                print(name, "ok")
            except OSError as e:
                print(name, errno.errorcode[e.errno])
        attempt("read-secret", lambda: open({str(secret)!r}).read())
        attempt("list-root", lambda: os.listdir("/"))
        attempt("write-site-packages", lambda: open(os.path.join(sys.prefix, "x.pth"), "w"))
        attempt("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        attempt("kill-supervisor", lambda: os.kill(os.getppid(), 9))
        attempt("kill-bystander", lambda: os.kill({bystander.pid}, 9))
        libc = ctypes.CDLL(None, use_errno=True)
        def mount():
            if libc.mount(None, None, None, 0, None) < 0:
                raise OSError(ctypes.get_errno(), "mount")
        attempt("mount", mount)
        print("done")
        """
    )
    assert bystander.poll() is None
    assert out.lines == [
        "read-secret EACCES",
        "list-root EACCES",
        "write-site-packages EACCES",
        "socket EPERM",
        "kill-supervisor EPERM",
        "kill-bystander EPERM",
        "mount EPERM",
        "done",
    ]


@attack("whole-tree stop: a descendant that left the program's session", "subreaper, cgroup")
def test_daemon_outside_the_session(hostile: Hostile) -> None:
    # A daemon in a session of its own is not in the program's process group
    # (the pause lets it get there): `capvisor run` adopts it as the child
    # subreaper and kills it once the program is done (`up` and the service:
    # its cgroup, or the subreaper at stop; tests/test_up.py, test_service.py).
    hostile.user.own(hostile.work)
    out = hostile.run(
        "/bin/sh",
        "-c",
        "setsid /bin/sleep 300 </dev/null >/dev/null 2>&1 & echo $! >&3; /bin/sleep 0.3; echo done",
        extra="""
        fds:
          pid: !file {path: daemon.pid, mode: w, create: true}
        runtime: [/usr/bin/setsid, /bin/sleep]
        """,
    )
    assert out.lines == ["done"]
    pid = int((hostile.work / "daemon.pid").read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        cmdline = b""
    if cmdline == b"/bin/sleep\x00300\x00":
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"HOLE: the daemon {pid} outlived capvisor run")
