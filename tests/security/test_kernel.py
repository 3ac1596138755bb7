"""Kernel attack surface: dangerous syscalls, other architectures, prctl, ttys.

Each probe passes arguments that make the call fail harmlessly if it were
allowed (EBADF, EFAULT, EINVAL: noted per line), so the EPERM the test
expects can only come from the seccomp filter (bubblewrap's try-syscall).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest

from .conftest import Hostile
from .harness import ATTACKS, Attack, Outcome, assert_healthy, attack


@dataclass(frozen=True)
class Probe:
    id: str
    row: str
    body: str
    expected: tuple[str, ...]
    mechanism: str = "seccomp (always denied)"


PROBES = [
    Probe(
        "io_uring",
        "io_uring_setup",
        """
        TRY("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));       /* else EFAULT */
        TRY("io_uring_enter", syscall(SYS_io_uring_enter, -1, 0, 0, 0, NULL, 0)); /* else EBADF */
        TRY("io_uring_register", syscall(SYS_io_uring_register, -1, 0, NULL, 0));
        """,
        ("io_uring_setup EPERM", "io_uring_enter EPERM", "io_uring_register EPERM"),
    ),
    Probe(
        "userfaultfd",
        "userfaultfd",
        """
        TRY("userfaultfd", syscall(SYS_userfaultfd, -1));                  /* else EINVAL */
        TRY("dev-userfaultfd", open("/dev/userfaultfd", O_RDWR));
        """,
        ("userfaultfd EPERM", "dev-userfaultfd EACCES"),
        "seccomp (always denied); the device: Landlock",
    ),
    Probe(
        "bpf",
        "bpf, perf_event_open",
        """
        TRY("bpf", syscall(SYS_bpf, -1, NULL, 0));                          /* else EINVAL */
        TRY("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0)); /* else EFAULT */
        """,
        ("bpf EPERM", "perf_event_open EPERM"),
    ),
    Probe(
        "keyctl",
        "keyctl, add_key, request_key (keyrings are not namespaced)",
        """
        TRY("keyctl", syscall(SYS_keyctl, -1, 0, 0, 0, 0));                 /* else EOPNOTSUPP */
        TRY("add_key", syscall(SYS_add_key, NULL, NULL, NULL, 0, 0));      /* else EFAULT */
        TRY("request_key", syscall(SYS_request_key, NULL, NULL, NULL, 0)); /* else EFAULT */
        """,
        ("keyctl EPERM", "add_key EPERM", "request_key EPERM"),
    ),
    Probe(
        "namespaces",
        "unshare, setns, mount, clone with namespace flags, chroot, pivot_root",
        """
        #include <sched.h>
        TRY("unshare-user", unshare(CLONE_NEWUSER));
        TRY("unshare-bogus", syscall(SYS_unshare, -1));                   /* else EINVAL */
        TRY("setns", syscall(SYS_setns, -1, 0));                          /* else EBADF */
        TRY("mount", syscall(SYS_mount, NULL, NULL, NULL, 0, NULL));      /* else EFAULT */
        TRY("umount2", syscall(SYS_umount2, NULL, 0));                    /* else EFAULT */
        TRY("open_tree", syscall(SYS_open_tree, -1, NULL, 0));            /* else EBADF */
        TRY("fsopen", syscall(SYS_fsopen, NULL, 0));                      /* else EFAULT */
        TRY("chroot", syscall(SYS_chroot, NULL));                         /* else EFAULT */
        TRY("pivot_root", syscall(SYS_pivot_root, NULL, NULL));           /* else EFAULT */
        TRY("clone-newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, 0));
        TRY("clone-newns-high-bits", syscall(SYS_clone, 0xffffffff00000000UL | CLONE_NEWNS | SIGCHLD,
                                             NULL, NULL, NULL, 0));
        TRY("clone3", syscall(SYS_clone3, NULL, 0));                     /* ENOSYS: libc falls back */
        """,
        (
            "unshare-user EPERM",
            "unshare-bogus EPERM",
            "setns EPERM",
            "mount EPERM",
            "umount2 EPERM",
            "open_tree EPERM",
            "fsopen EPERM",
            "chroot EPERM",
            "pivot_root EPERM",
            "clone-newuser EPERM",
            "clone-newns-high-bits EPERM",
            "clone3 ENOSYS",
        ),
        "seccomp (always denied; clone flags checked on their low 32 bits)",
    ),
    Probe(
        "personality",
        "personality (ASLR off, READ_IMPLIES_EXEC)",
        """
        #include <sys/personality.h>
        TRY("no-randomize", personality(ADDR_NO_RANDOMIZE));
        TRY("read-implies-exec", personality(READ_IMPLIES_EXEC));
        TRY("high-bits", syscall(SYS_personality, 0x100000000UL | ADDR_NO_RANDOMIZE));
        TRY("query", personality(0xffffffff));
        """,
        ("no-randomize EPERM", "read-implies-exec EPERM", "high-bits EPERM", "query ok"),
        "seccomp (argument guard)",
    ),
    Probe(
        "prctl",
        "prctl tricks (PR_SET_MM, dumpable, ptracer, subreaper, securebits, ambient caps)",
        """
        #include <sys/prctl.h>
        TRY("set-mm", prctl(PR_SET_MM, PR_SET_MM_START_CODE, 0, 0, 0));
        TRY("set-dumpable", prctl(PR_SET_DUMPABLE, 1, 0, 0, 0));
        TRY("set-ptracer", prctl(PR_SET_PTRACER, -1, 0, 0, 0));
        TRY("set-subreaper", prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0));
        TRY("set-securebits", prctl(PR_SET_SECUREBITS, 0, 0, 0, 0));
        TRY("cap-ambient", prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, 0, 0, 0));
        TRY("capbset-drop", prctl(PR_CAPBSET_DROP, 0, 0, 0, 0));
        TRY("set-keepcaps", prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0));
        TRY("mce-kill", prctl(PR_MCE_KILL, 0, 0, 0, 0));
        TRY("clear-nnp", prctl(PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0));         /* the kernel: EINVAL */
        printf("nnp=%d\\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
        """,
        (
            "set-mm EPERM",
            "set-dumpable EPERM",
            "set-ptracer EPERM",
            "set-subreaper EPERM",
            "set-securebits EPERM",
            "cap-ambient EPERM",
            "capbset-drop EPERM",
            "set-keepcaps EPERM",
            "mce-kill EPERM",
            "clear-nnp EINVAL",
            "nnp=1",
        ),
        "seccomp (prctl options allow-list); no_new_privs cannot be cleared",
    ),
    Probe(
        "seccomp_stacking",
        "install another seccomp filter that allows everything",
        """
        #include <linux/filter.h>
        #include <linux/seccomp.h>
        struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog prog = {1, allow};
        TRY("install", syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog));
        TRY("listener", syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog));
        TRY("mount-after", syscall(SYS_mount, NULL, NULL, NULL, 0, NULL));
        TRY("ptrace-after", syscall(SYS_ptrace, 0x4206, -1, 0, 0));
        TRY("socket-after", syscall(SYS_socket, 2, 1, 0));
        """,
        (
            "install ok",
            "listener ok",
            "mount-after EPERM",
            "ptrace-after EPERM",
            "socket-after EPERM",
        ),
        "seccomp (filters stack; the strictest answer wins)",
    ),
    Probe(
        "modules_and_machine",
        "kernel modules, reboot, kexec, clock, swap, raw I/O, file handles",
        """
        TRY("init_module", syscall(SYS_init_module, NULL, 0, NULL));       /* else EFAULT */
        TRY("finit_module", syscall(SYS_finit_module, -1, NULL, 0));       /* else EBADF */
        TRY("reboot", syscall(SYS_reboot, 0, 0, 0, NULL));                 /* else EINVAL */
        TRY("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, -1));        /* else EINVAL */
        TRY("settimeofday", syscall(SYS_settimeofday, NULL, NULL));
        TRY("swapon", syscall(SYS_swapon, NULL, 0));                       /* else EFAULT */
        TRY("iopl", syscall(SYS_iopl, 99));                                /* else EINVAL */
        TRY("open_by_handle_at", syscall(SYS_open_by_handle_at, -1, NULL, 0)); /* else EBADF */
        TRY("name_to_handle_at", syscall(SYS_name_to_handle_at, -1, NULL, NULL, NULL, 0));
        """,
        (
            "init_module EPERM",
            "finit_module EPERM",
            "reboot EPERM",
            "kexec_load EPERM",
            "settimeofday EPERM",
            "swapon EPERM",
            "iopl EPERM",
            "open_by_handle_at EPERM",
            "name_to_handle_at EPERM",
        ),
    ),
    Probe(
        "sysv_ipc",
        "SysV IPC and POSIX message queues (shared with the whole IPC namespace)",
        """
        TRY("shmget", syscall(SYS_shmget, 0, 0, 0));                       /* else EINVAL */
        TRY("msgget", syscall(SYS_msgget, 0, 0));                          /* else ENOENT */
        TRY("semget", syscall(SYS_semget, 0, -1, 0));                      /* else EINVAL */
        TRY("mq_open", syscall(SYS_mq_open, NULL, 0, 0, NULL));            /* else EFAULT */
        """,
        ("shmget EPERM", "msgget EPERM", "semget EPERM", "mq_open EPERM"),
        "seccomp (not in the default policy)",
    ),
]

for _probe in PROBES:
    ATTACKS[f"test_dangerous_syscalls[{_probe.id}]"] = Attack(_probe.row, _probe.mechanism)


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_dangerous_syscalls(hostile: Hostile, probe: Probe) -> None:
    includes = "".join(line + "\n" for line in probe.body.splitlines() if "#include" in line)
    body = "".join(line + "\n" for line in probe.body.splitlines() if "#include" not in line)
    prog = hostile.c(probe.id, includes + "int main(void) {\n" + body + "DONE();\n}\n")
    out = hostile.run(prog)
    assert out.lines == [*probe.expected, "done"]


INT80 = """
int main(void) {
    long ret;
    puts("before");
    fflush(stdout);
    /* i386 getpid (20) through the 32-bit entry point. */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20) : "memory");
    printf("after %ld\\n", ret);
    return 0;
}
"""

X32 = """
int main(void) {
    puts("before");
    fflush(stdout);
    /* x32 getpid: the x86_64 entry point with __X32_SYSCALL_BIT. */
    long ret = syscall(0x40000000 | 39);
    printf("after %ld\\n", ret);
    return 0;
}
"""


@attack("i386 `int 0x80` and x32 syscalls", "seccomp (foreign architecture: SIGSYS)")
@pytest.mark.parametrize("source", [INT80, X32], ids=["int80", "x32"])
def test_foreign_architecture_syscalls_kill(hostile: Hostile, source: str) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("x86_64 only")
    prog = hostile.c("int80" if "int $0x80" in source else "x32", source)
    out = hostile.run(prog, code=128 + signal.SIGSYS)
    assert out.lines == ["before"]


@attack("TIOCSTI / TIOCLINUX on an inherited terminal", "seccomp (argument guard)")
def test_terminal_injection(hostile: Hostile) -> None:
    master, slave = os.openpty()
    try:
        prog = hostile.c(
            "tiocsti",
            """
            #include <sys/ioctl.h>
            int main(void) {
                char c = 'x';
                TRY("tiocsti", ioctl(0, TIOCSTI, &c));
                TRY("tiocsti-null", ioctl(0, TIOCSTI, NULL));              /* else EFAULT */
                TRY("tioclinux", ioctl(0, TIOCLINUX, &c));
                TRY("tiocsti-high-bits", syscall(SYS_ioctl, 0, 0x100000000UL | TIOCSTI, &c));
                TRY("tcgets", ioctl(0, TCGETS, &(char[64]){0}));           /* allowed */
                DONE();
            }
            """,
        )
        result = hostile.capvisor.run(
            hostile.capvisor.describe(f"program: {prog}\nstdin: !fd stdin\n"), stdin=slave
        )
        out = Outcome(result.returncode, result.stdout, result.stderr)
        assert_healthy(out, 0)
        os.set_blocking(slave, False)
        with pytest.raises(BlockingIOError):
            os.read(slave, 100)  # nothing was pushed into the terminal's input
    finally:
        os.close(master)
        os.close(slave)
    assert out.lines == [
        "tiocsti EPERM",
        "tiocsti-null EPERM",
        "tioclinux EPERM",
        "tiocsti-high-bits EPERM",
        "tcgets ok",
        "done",
    ]
