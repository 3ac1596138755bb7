"""Static tables for seccomp policies: syscall groups, always-denied calls, constants.

Pure data, written by hand from the x86_64 syscall table (``arch/x86/entry/
syscalls/syscall_64.tbl``) and the uapi headers; nothing here asks libseccomp
or the kernel. :mod:`supervisor.policy` resolves the names against
libseccomp and compiles them. ``docs/policies.md`` lists every group; a test
keeps that list and :data:`GROUPS` in step.

- :data:`GROUPS` — named sets of syscalls with systemd-style ``@names``. A
  member is a syscall name or another ``@group``. A few members are names
  from other architectures (``_llseek``, ``_newselect``, ``recv``, ...);
  a group expanded on x86_64 skips them, so groups stay portable.
- :data:`ALWAYS_DENIED` — what every compiled filter denies whatever the
  policy says, either outright or for some argument values.
- :data:`CONSTANTS` — the names policies may use in argument conditions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """A named set of syscalls; ``members`` may name other groups."""

    name: str
    help: str
    members: tuple[str, ...]


def _group(name: str, help: str, members: str) -> tuple[str, Group]:
    return name, Group(name, help, tuple(members.split()))


#: Every group a policy may name, by name (with its ``@``).
GROUPS: Mapping[str, Group] = dict(
    [
        _group(
            "@default",
            "What any program needs to start and run: exec, memory, threads, "
            "time, identity and other questions a process asks about itself",
            """
            arch_prctl brk capget clock_getres clock_gettime clock_nanosleep execve
            execveat exit exit_group futex futex_requeue futex_wait futex_waitv futex_wake
            get_mempolicy get_robust_list getcpu getegid geteuid getgid getgroups getpgid
            getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit
            getrusage getsid gettid gettimeofday getuid ioprio_get madvise map_shadow_stack
            membarrier mincore mmap mprotect mremap munmap nanosleep pause restart_syscall
            rseq rt_sigreturn sched_get_priority_max sched_get_priority_min
            sched_getaffinity sched_getattr sched_getparam sched_getscheduler
            sched_rr_get_interval sched_yield set_robust_list set_tid_address sysinfo time
            uname
            sigreturn ugetrlimit mmap2 futex_time64 clock_gettime64 clock_getres_time64
            clock_nanosleep_time64
            """,
        ),
        _group(
            "@aio",
            "Asynchronous I/O (io_uring is always denied)",
            """
            io_cancel io_destroy io_getevents io_pgetevents io_setup io_submit
            io_uring_enter io_uring_register io_uring_setup
            """,
        ),
        _group(
            "@basic-io",
            "Reading, writing, seeking, duplicating and closing open file descriptors",
            """
            close close_range copy_file_range dup dup2 dup3 lseek pread64 preadv preadv2
            pwrite64 pwritev pwritev2 read readv sendfile splice tee vmsplice write writev
            _llseek sendfile64
            """,
        ),
        _group(
            "@chown",
            "Changing the owner of files",
            "chown fchown fchownat lchown chown32 fchown32 lchown32",
        ),
        _group(
            "@clock",
            "Setting the system clock (always denied)",
            "adjtimex clock_adjtime clock_settime settimeofday stime",
        ),
        _group(
            "@cpu-emulation",
            "Segment descriptors and CPU emulation",
            "get_thread_area modify_ldt set_thread_area vm86 vm86old subpage_prot switch_endian",
        ),
        _group(
            "@debug",
            "Debugging, tracing, performance monitoring, reading other processes (always "
            "denied but for kcmp and process_madvise)",
            """
            kcmp lookup_dcookie perf_event_open pidfd_getfd process_madvise
            process_vm_readv process_vm_writev ptrace
            """,
        ),
        _group(
            "@file-system",
            "Paths, metadata, directories, extended attributes and file descriptor "
            "flags (the paths themselves are Landlock's business; changing a file's "
            "mode, extended attributes or times by path is @path-metadata)",
            """
            access cachestat chdir creat faccessat faccessat2 fadvise64 fallocate
            fchdir fchmod fcntl fgetxattr flistxattr flock fremovexattr
            fsetxattr fstat fstatfs ftruncate getcwd getdents getdents64 getxattr
            inotify_add_watch inotify_init inotify_init1 inotify_rm_watch lgetxattr link
            linkat listxattr llistxattr lstat mkdir mkdirat mknod
            mknodat newfstatat open openat openat2 readahead readlink readlinkat
            rename renameat renameat2 rmdir stat statfs statx symlink symlinkat
            truncate umask unlink unlinkat
            fcntl64 fstat64 fstatat64 lstat64 stat64 statfs64 fstatfs64 truncate64
            ftruncate64 fadvise64_64
            """,
        ),
        _group(
            "@io-event",
            "Waiting for file descriptors: poll, select, epoll, eventfd",
            """
            epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd
            eventfd2 poll ppoll pselect6 select
            _newselect
            """,
        ),
        _group(
            "@ipc",
            "Pipes, memfd, SysV IPC and POSIX message queues (SysV IPC and message "
            "queues are shared with the whole IPC namespace)",
            """
            memfd_create mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend
            mq_unlink msgctl msgget msgrcv msgsnd pipe pipe2 semctl semget semop semtimedop
            shmat shmctl shmdt shmget
            ipc
            """,
        ),
        _group(
            "@keyring",
            "The kernel keyring (always denied)",
            "add_key keyctl request_key",
        ),
        _group(
            "@memlock",
            "Locking memory and secret memory",
            "memfd_secret mlock mlock2 mlockall munlock munlockall",
        ),
        _group(
            "@module",
            "Loading and unloading kernel modules (always denied)",
            "delete_module finit_module init_module",
        ),
        _group(
            "@mount",
            "Mounting, unmounting and changing the root (always denied)",
            """
            chroot fsconfig fsmount fsopen fspick mount mount_setattr move_mount open_tree
            pivot_root umount2
            umount
            """,
        ),
        _group(
            "@namespaces",
            "Creating and joining namespaces (always denied; clone flags are "
            "restricted with conditions)",
            "setns unshare",
        ),
        _group(
            "@network-io",
            "Using sockets that are already open: accept, send, receive, options, "
            "addresses (creating sockets is @socket)",
            """
            accept accept4 bind connect getpeername getsockname getsockopt listen recvfrom
            recvmmsg recvmsg sendmmsg sendmsg sendto setsockopt shutdown
            recv send
            """,
        ),
        _group(
            "@obsolete",
            "Unimplemented, removed or obsolete syscalls",
            """
            _sysctl afs_syscall create_module epoll_ctl_old epoll_wait_old get_kernel_syms
            getpmsg nfsservctl putpmsg query_module remap_file_pages security sysfs tuxcall
            uselib ustat vserver
            bdflush break ftime gtty idle lock mpx prof profil sgetmask ssetmask stty ulimit
            """,
        ),
        _group(
            "@path-metadata",
            "Changing a file's mode, extended attributes or times by path. Landlock "
            "has no access right for these, so they reach files outside every mount: "
            "allow utimensat with a null path (futimens) and the fd-based calls instead",
            """
            chmod fchmodat fchmodat2 futimesat lremovexattr lsetxattr removexattr
            setxattr utime utimensat utimes
            """,
        ),
        _group(
            "@pkey",
            "Memory protection keys",
            "pkey_alloc pkey_free pkey_mprotect",
        ),
        _group(
            "@privileged",
            "Syscalls that need capabilities a sandboxed program should not have",
            """
            @chown @clock @module @mount @raw-io @reboot @swap
            _sysctl acct bpf capset fanotify_init fanotify_mark name_to_handle_at
            nfsservctl open_by_handle_at quotactl quotactl_fd setdomainname setfsuid
            setgroups sethostname setresuid setreuid setuid syslog vhangup
            """,
        ),
        _group(
            "@process",
            "Creating, executing, waiting for and signalling processes",
            """
            clone clone3 execve execveat fork kill personality pidfd_open pidfd_send_signal
            prctl process_mrelease rt_sigqueueinfo rt_tgsigqueueinfo setpgid setsid tgkill
            tkill vfork wait4 waitid
            waitpid
            """,
        ),
        _group(
            "@raw-io",
            "Raw I/O port access (always denied)",
            "ioperm iopl pciconfig_iobase pciconfig_read pciconfig_write",
        ),
        _group(
            "@reboot",
            "Rebooting and kexec (always denied)",
            "kexec_file_load kexec_load reboot",
        ),
        _group(
            "@resources",
            "Changing scheduling, priorities, memory placement and resource limits",
            """
            ioprio_set mbind migrate_pages move_pages prlimit64 sched_setaffinity
            sched_setattr sched_setparam sched_setscheduler set_mempolicy
            set_mempolicy_home_node setpriority setrlimit
            nice
            """,
        ),
        _group(
            "@sandbox",
            "Restricting oneself further: Landlock and seccomp",
            "landlock_add_rule landlock_create_ruleset landlock_restrict_self seccomp",
        ),
        _group(
            "@setuid",
            "Changing user and group credentials",
            """
            setfsgid setfsuid setgid setgroups setregid setresgid setresuid setreuid setuid
            setgid32 setgroups32 setregid32 setresgid32 setresuid32 setreuid32 setuid32
            """,
        ),
        _group(
            "@signal",
            "Handling signals (sending them is @process)",
            """
            rt_sigaction rt_sigpending rt_sigprocmask rt_sigsuspend rt_sigtimedwait
            sigaltstack signalfd signalfd4
            sigaction signal sigpending sigprocmask sigsuspend
            """,
        ),
        _group(
            "@socket",
            "Creating sockets; Landlock cannot see every family, so allow this with "
            "conditions on the family",
            "socket socketpair socketcall",
        ),
        _group(
            "@swap",
            "Enabling and disabling swap (always denied)",
            "swapoff swapon",
        ),
        _group(
            "@sync",
            "Flushing files and memory to storage",
            "fdatasync fsync msync sync sync_file_range syncfs sync_file_range2",
        ),
        _group(
            "@timer",
            "Timers and alarms",
            """
            alarm getitimer setitimer timer_create timer_delete timer_getoverrun
            timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times
            """,
        ),
    ]
)

#: x86_64 syscalls in no group on purpose: each is a door to many operations,
#: to allow with conditions on its arguments (``allow_if``).
UNGROUPED: frozenset[str] = frozenset({"ioctl", "userfaultfd"})


def expand(name: str, via: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Yield ``(syscall, groups it came through)`` for every member of group ``name``.

    Nested groups are followed depth first; ``via`` starts with ``name``.
    Raises KeyError for an unknown group (a bug in the tables, or a caller
    that did not check the name against :data:`GROUPS`).
    """
    via = (*via, name)
    for member in GROUPS[name].members:
        if member.startswith("@"):
            yield from expand(member, via)
        else:
            yield member, via


@dataclass(frozen=True)
class ArgGuard:
    """A condition on one argument under which a syscall is always denied.

    The argument's low 32 bits are compared, as the kernel reads an ``int``
    argument. With ``only`` the syscall is denied unless the value is one of
    ``values``; otherwise it is denied when the value is one of them.
    """

    arg: int
    values: tuple[int, ...]
    only: bool

    def denies(self, value: int) -> bool:
        """Whether a call with this argument value is denied."""
        return ((value & 0xFFFFFFFF) in self.values) != self.only


#: personality(2) values that change nothing dangerous: PER_LINUX (0), the
#: query 0xffffffff, and PER_LINUX32 (8), which only makes uname(2) report a
#: 32-bit machine (``linux32``/``setarch i686``). ADDR_NO_RANDOMIZE,
#: READ_IMPLIES_EXEC and the other flags weaken the exec'd program.
PERSONALITY_HARMLESS: tuple[int, ...] = (0x0, 0x8, 0xFFFFFFFF)

#: TIOCSTI (push bytes into a terminal's input) and TIOCLINUX (console
#: selection paste, among others): both inject input into whatever reads
#: the terminal next, outside the sandbox.
TTY_INJECTION: tuple[int, ...] = (0x5412, 0x541C)

#: Syscalls every compiled filter denies whatever the policy says: ``None``
#: denies the call outright, an :class:`ArgGuard` denies it for some
#: argument values. An ``errno:`` entry of a policy may choose the error a
#: denied call fails with; nothing can allow it.
ALWAYS_DENIED: Mapping[str, ArgGuard | None] = {
    # Reading or changing other processes.
    "ptrace": None,
    "process_vm_readv": None,
    "process_vm_writev": None,
    "pidfd_getfd": None,
    # Mount table and root.
    "mount": None,
    "umount2": None,
    "move_mount": None,
    "open_tree": None,
    "fsopen": None,
    "fsconfig": None,
    "fsmount": None,
    "fspick": None,
    "mount_setattr": None,
    "pivot_root": None,
    "chroot": None,
    # Namespaces: a new user namespace brings capabilities and attack surface.
    "unshare": None,
    "setns": None,
    # Large kernel attack surface, or tracing the kernel.
    "bpf": None,
    "perf_event_open": None,
    "userfaultfd": None,
    "io_uring_setup": None,
    "io_uring_enter": None,
    "io_uring_register": None,
    "lookup_dcookie": None,
    # Keyrings are not namespaced.
    "keyctl": None,
    "add_key": None,
    "request_key": None,
    # The machine itself: kernel, modules, power, swap, clock, accounting.
    "kexec_load": None,
    "kexec_file_load": None,
    "init_module": None,
    "finit_module": None,
    "delete_module": None,
    "reboot": None,
    "swapon": None,
    "swapoff": None,
    "settimeofday": None,
    "clock_settime": None,
    "clock_adjtime": None,
    "adjtimex": None,
    "quotactl": None,
    "acct": None,
    "vhangup": None,
    "iopl": None,
    "ioperm": None,
    # File handles bypass path-based checks (Landlock).
    "open_by_handle_at": None,
    "name_to_handle_at": None,
    # Only the harmless personalities.
    "personality": ArgGuard(arg=0, values=PERSONALITY_HARMLESS, only=True),
    # No terminal input injection.
    "ioctl": ArgGuard(arg=1, values=TTY_INJECTION, only=False),
}

#: Named constants for argument conditions (x86_64 values). Conditions
#: compare an argument's low 32 bits, so negative values (AT_FDCWD) are
#: taken modulo 2**32.
CONSTANTS: Mapping[str, int] = {
    # Address families (socket, socketpair).
    "AF_UNSPEC": 0,
    "AF_UNIX": 1,
    "AF_LOCAL": 1,
    "AF_INET": 2,
    "AF_AX25": 3,
    "AF_IPX": 4,
    "AF_APPLETALK": 5,
    "AF_X25": 9,
    "AF_INET6": 10,
    "AF_KEY": 15,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    "AF_RDS": 21,
    "AF_LLC": 26,
    "AF_CAN": 29,
    "AF_TIPC": 30,
    "AF_BLUETOOTH": 31,
    "AF_ALG": 38,
    "AF_VSOCK": 40,
    "AF_XDP": 44,
    # Socket types and flags.
    "SOCK_STREAM": 1,
    "SOCK_DGRAM": 2,
    "SOCK_RAW": 3,
    "SOCK_RDM": 4,
    "SOCK_SEQPACKET": 5,
    "SOCK_NONBLOCK": 0o4000,
    "SOCK_CLOEXEC": 0o2000000,
    # clone(2) flags.
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_VM": 0x00000100,
    "CLONE_FS": 0x00000200,
    "CLONE_FILES": 0x00000400,
    "CLONE_SIGHAND": 0x00000800,
    "CLONE_PIDFD": 0x00001000,
    "CLONE_PTRACE": 0x00002000,
    "CLONE_VFORK": 0x00004000,
    "CLONE_PARENT": 0x00008000,
    "CLONE_THREAD": 0x00010000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_SYSVSEM": 0x00040000,
    "CLONE_SETTLS": 0x00080000,
    "CLONE_PARENT_SETTID": 0x00100000,
    "CLONE_CHILD_CLEARTID": 0x00200000,
    "CLONE_DETACHED": 0x00400000,
    "CLONE_UNTRACED": 0x00800000,
    "CLONE_CHILD_SETTID": 0x01000000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
    # Terminal and file ioctls.
    "TCGETS": 0x5401,
    "TCSETS": 0x5402,
    "TCSETSW": 0x5403,
    "TCSETSF": 0x5404,
    "TCSBRK": 0x5409,
    "TCXONC": 0x540A,
    "TCFLSH": 0x540B,
    "TIOCSCTTY": 0x540E,
    "TIOCGPGRP": 0x540F,
    "TIOCSPGRP": 0x5410,
    "TIOCOUTQ": 0x5411,
    "TIOCSTI": 0x5412,
    "TIOCGWINSZ": 0x5413,
    "TIOCSWINSZ": 0x5414,
    "FIONREAD": 0x541B,
    "TIOCINQ": 0x541B,
    "TIOCLINUX": 0x541C,
    "FIONBIO": 0x5421,
    "TIOCNOTTY": 0x5422,
    "TIOCGSID": 0x5429,
    "TIOCGPTN": 0x80045430,
    "TIOCSPTLCK": 0x40045431,
    "FIONCLEX": 0x5450,
    "FIOCLEX": 0x5451,
    "FIOASYNC": 0x5452,
    "FIOQSIZE": 0x5460,
    # fcntl(2) commands.
    "F_DUPFD": 0,
    "F_GETFD": 1,
    "F_SETFD": 2,
    "F_GETFL": 3,
    "F_SETFL": 4,
    "F_GETLK": 5,
    "F_SETLK": 6,
    "F_SETLKW": 7,
    "F_SETOWN": 8,
    "F_GETOWN": 9,
    "F_SETSIG": 10,
    "F_GETSIG": 11,
    "F_OFD_GETLK": 36,
    "F_OFD_SETLK": 37,
    "F_OFD_SETLKW": 38,
    "F_SETLEASE": 1024,
    "F_GETLEASE": 1025,
    "F_NOTIFY": 1026,
    "F_DUPFD_CLOEXEC": 1030,
    "F_SETPIPE_SZ": 1031,
    "F_GETPIPE_SZ": 1032,
    "F_ADD_SEALS": 1033,
    "F_GET_SEALS": 1034,
    # prctl(2) options.
    "PR_SET_PDEATHSIG": 1,
    "PR_GET_PDEATHSIG": 2,
    "PR_GET_DUMPABLE": 3,
    "PR_SET_DUMPABLE": 4,
    "PR_GET_KEEPCAPS": 7,
    "PR_SET_KEEPCAPS": 8,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21,
    "PR_SET_SECCOMP": 22,
    "PR_CAPBSET_READ": 23,
    "PR_GET_TIMERSLACK": 30,
    "PR_SET_TIMERSLACK": 29,
    "PR_SET_MM": 35,
    "PR_SET_CHILD_SUBREAPER": 36,
    "PR_GET_CHILD_SUBREAPER": 37,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39,
    "PR_GET_TID_ADDRESS": 40,
    "PR_SET_THP_DISABLE": 41,
    "PR_GET_THP_DISABLE": 42,
    "PR_CAP_AMBIENT": 47,
    "PR_SET_VMA": 0x53564D41,
    "PR_SET_PTRACER": 0x59616D61,
    # personality(2).
    "PER_LINUX": 0x0,
    "PER_LINUX32": 0x8,
    "PER_QUERY": 0xFFFFFFFF,
    "ADDR_NO_RANDOMIZE": 0x0040000,
    "READ_IMPLIES_EXEC": 0x0400000,
    # mmap(2) and mprotect(2).
    "PROT_NONE": 0x0,
    "PROT_READ": 0x1,
    "PROT_WRITE": 0x2,
    "PROT_EXEC": 0x4,
    "MAP_SHARED": 0x01,
    "MAP_PRIVATE": 0x02,
    "MAP_FIXED": 0x10,
    "MAP_ANONYMOUS": 0x20,
    # open(2) flags (x86_64). O_TMPFILE includes O_DIRECTORY, as in the
    # headers; to refuse O_TMPFILE but not O_DIRECTORY, mask __O_TMPFILE.
    "O_RDONLY": 0o0,
    "O_WRONLY": 0o1,
    "O_RDWR": 0o2,
    "O_ACCMODE": 0o3,
    "O_CREAT": 0o100,
    "O_EXCL": 0o200,
    "O_NOCTTY": 0o400,
    "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000,
    "O_NONBLOCK": 0o4000,
    "O_DIRECTORY": 0o200000,
    "O_NOFOLLOW": 0o400000,
    "O_CLOEXEC": 0o2000000,
    "O_PATH": 0o10000000,
    "__O_TMPFILE": 0o20000000,
    "O_TMPFILE": 0o20200000,
    # *at() directory descriptors and flags.
    "AT_FDCWD": -100 & 0xFFFFFFFF,
    "AT_SYMLINK_NOFOLLOW": 0x100,
    "AT_REMOVEDIR": 0x200,
    "AT_SYMLINK_FOLLOW": 0x400,
    "AT_EMPTY_PATH": 0x1000,
}
