"""File system escapes: every path out of the granted tree, and what Landlock cannot see.

The tree each test attacks (made fresh by the ``tree`` fixture)::

    secret.txt          0644, outside every mount: must stay unreadable
    data/               !mount ro (fd 3), 0777
      file.txt          0666
      sub/              0777
      link-rel -> ../secret.txt
      link-abs -> <work>/secret.txt
    out/                !mount rw (fd 4), owned by the supervisor's user

The modes above let every user do what is attempted, so EACCES can only come
from Landlock (the program has no capabilities, as root neither).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Hostile
from .harness import attack

MOUNTS = """
fds:
  data: !mount {path: data, mode: ro}
  out: !mount {path: out, mode: rw}
"""


@dataclass(frozen=True)
class Tree:
    work: Path
    secret: Path
    data: Path
    out: Path


@pytest.fixture
def tree(hostile: Hostile) -> Tree:
    work = hostile.work
    secret = work / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o644)
    data = work / "data"
    (data / "sub").mkdir(parents=True)
    (data / "file.txt").write_text("mounted")
    (data / "file.txt").chmod(0o666)
    for path in (data, data / "sub"):
        path.chmod(0o777)
    (data / "link-rel").symlink_to("../secret.txt")
    (data / "link-abs").symlink_to(secret)
    out = work / "out"
    out.mkdir()
    hostile.user.own(out)
    return Tree(work, secret, data, out)


def _untouched(tree: Tree) -> None:
    assert tree.secret.read_text() == "top secret"
    assert sorted(os.listdir(tree.data)) == ["file.txt", "link-abs", "link-rel", "sub"]
    assert (tree.data / "file.txt").read_text() == "mounted"


@attack("read a file by absolute path", "Landlock")
def test_absolute_paths(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "abs_paths",
        """
        int main(int argc, char **argv) {
            TRY("secret", open(argv[1], O_RDONLY));
            TRY("passwd", open("/etc/passwd", O_RDONLY));
            TRY("root-dir", open("/", O_RDONLY | O_DIRECTORY));
            TRY("work-dir", open(argv[2], O_RDONLY | O_DIRECTORY));
            char *sh[] = {"/bin/sh", "-c", "echo escaped", NULL};
            TRY("exec-sh", execve("/bin/sh", sh, NULL));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(tree.secret), str(tree.work), extra=MOUNTS)
    assert out.lines == [
        "secret EACCES",
        "passwd EACCES",
        "root-dir EACCES",
        "work-dir EACCES",
        "exec-sh EACCES",
        "done",
    ]


@attack("`..` from a granted directory fd", "Landlock")
def test_dotdot_from_granted_dirfd(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "dotdot",
        """
        int main(void) {
            TRY("dotdot", openat(3, "../secret.txt", O_RDONLY));
            TRY("sub-dotdot", openat(3, "sub/../../secret.txt", O_RDONLY));
            TRY("parent-dir", openat(3, "..", O_RDONLY | O_DIRECTORY));
            TRY("fchdir", fchdir(3));
            TRY("cwd-dotdot", open("../secret.txt", O_RDONLY));
            TRY("inside", openat(3, "sub/../file.txt", O_RDONLY));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra=MOUNTS)
    assert out.lines == [
        "dotdot EACCES",
        "sub-dotdot EACCES",
        "parent-dir EACCES",
        "fchdir ok",
        "cwd-dotdot EACCES",
        "inside ok",
        "done",
    ]


@attack("symlinks inside a mount pointing out of it", "Landlock")
def test_symlinks_out_of_a_mount(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "symlinks",
        """
        int main(int argc, char **argv) {
            TRY("link-rel", openat(3, "link-rel", O_RDONLY));
            TRY("link-abs", openat(3, "link-abs", O_RDONLY));
            TRY("plant-ro", symlinkat(argv[1], 3, "planted"));
            TRY("plant-rw", symlinkat(argv[1], 4, "planted"));
            TRY("follow-planted", openat(4, "planted", O_RDONLY));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(tree.secret), extra=MOUNTS)
    assert out.lines == [
        "link-rel EACCES",
        "link-abs EACCES",
        "plant-ro EACCES",
        "plant-rw ok",
        "follow-planted EACCES",
        "done",
    ]
    _untouched(tree)


@attack(
    "`/proc/self/root`, `/proc/<ppid>/root`, `/proc/*/fd/N` of an fd not granted",
    "Landlock (path rules; ptrace scoping of /proc/<pid>); fd placement",
)
def test_proc_magic_links(hostile: Hostile, tree: Tree) -> None:
    # The supervisor holds an open, inheritable fd of the secret it does not grant.
    held = os.open(tree.secret, os.O_RDONLY)
    try:
        prog = hostile.c(
            "proc_links",
            """
            int main(int argc, char **argv) {
                char path[256];
                int ppid = getppid();
                snprintf(path, sizeof path, "/proc/self/root%s", argv[1]);
                TRY("self-root", open(path, O_RDONLY));
                snprintf(path, sizeof path, "/proc/%d/root%s", ppid, argv[1]);
                TRY("ppid-root", open(path, O_RDONLY));
                snprintf(path, sizeof path, "/proc/self/fd/%s", argv[2]);
                TRY("self-fd", open(path, O_RDONLY));
                snprintf(path, sizeof path, "/proc/%d/fd/%s", ppid, argv[2]);
                TRY("ppid-fd", open(path, O_RDONLY));
                snprintf(path, sizeof path, "/proc/%d/cwd/secret.txt", ppid);
                TRY("ppid-cwd", open(path, O_RDONLY));
                TRY("own-fd-kept", fcntl(atoi(argv[2]), F_GETFD));
                DONE();
            }
            """,
        )
        out = hostile.run(prog, str(tree.secret), str(held), extra=MOUNTS, pass_fds=(held,))
    finally:
        os.close(held)
    transcript = out.transcript()
    assert transcript.pop("done", None) is None and out.lines[-1] == "done"
    # Landlock: EACCES. Not placed in the child: ENOENT under /proc/self/fd, EBADF.
    assert transcript == {
        "self-root": "EACCES",
        "ppid-root": "EACCES",
        "self-fd": "ENOENT",
        "ppid-fd": "EACCES",
        "ppid-cwd": "EACCES",
        "own-fd-kept": "EBADF",
    }


@attack("`O_PATH` + `fstatat`: metadata of any path", "not covered (Landlock); contents: Landlock")
def test_o_path_reveals_metadata_only(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "o_path",
        """
        #include <sys/xattr.h>
        int main(int argc, char **argv) {
            struct stat st;
            char buf[64], path[64];
            int fd = TRY("o_path", open(argv[1], O_PATH));
            if (TRY("fstat", fstat(fd, &st)) == 0)
                printf("size %lld\\n", (long long)st.st_size);
            TRY("fstatat", fstatat(AT_FDCWD, argv[1], &st, 0));
            TRY("access", access(argv[1], R_OK));
            TRY("getxattr", getxattr(argv[1], "user.none", buf, sizeof buf));  /* ENODATA */
            TRY("read", read(fd, buf, sizeof buf));
            TRY("openat-empty", openat(fd, "", O_RDONLY));
            snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
            TRY("reopen", open(path, O_RDONLY));
            TRY("mmap", (long)mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(tree.secret))
    assert out.lines == [
        "o_path ok",
        "fstat ok",
        "size 10",  # what Landlock cannot hide: existence, size, owner, times
        "fstatat ok",
        "access ok",  # access() reports the mode bits, not Landlock's verdict
        "getxattr ENODATA",  # looked up: the file was reached
        "read EBADF",
        "openat-empty ENOENT",
        "reopen EACCES",
        "mmap EBADF",
        "done",
    ]


@attack("`linkat`/`renameat` out of a read-only mount", "Landlock")
def test_link_and_rename_out_of_read_only_mount(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "link_rename",
        """
        #include <linux/fs.h>
        int main(void) {
            TRY("linkat", linkat(3, "file.txt", 4, "stolen", 0));
            TRY("renameat", renameat(3, "file.txt", 4, "moved"));
            TRY("renameat-dir", renameat(3, "sub", 4, "sub"));
            int fd = openat(4, "decoy", O_WRONLY | O_CREAT, 0666);
            close(fd);
            TRY("exchange", syscall(SYS_renameat2, 3, "file.txt", 4, "decoy", RENAME_EXCHANGE));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra=MOUNTS)
    transcript = out.transcript()
    assert out.lines[-1] == "done"
    # Landlock: EACCES for a missing right, EXDEV when a rename or link would
    # give a file more rights than it had (LANDLOCK_ACCESS_FS_REFER).
    for step in ("linkat", "renameat", "renameat-dir", "exchange"):
        assert transcript[step] in ("EACCES", "EXDEV"), (step, transcript)
    _untouched(tree)
    assert sorted(os.listdir(tree.out)) == ["decoy"]


@attack("mkdir, unlink, truncate in a read-only mount", "Landlock")
def test_changes_in_read_only_mount(hostile: Hostile, tree: Tree) -> None:
    prog = hostile.c(
        "ro_changes",
        """
        int main(int argc, char **argv) {
            TRY("mkdirat", mkdirat(3, "newdir", 0777));
            TRY("unlinkat", unlinkat(3, "file.txt", 0));
            TRY("rmdir", unlinkat(3, "sub", AT_REMOVEDIR));
            TRY("creat", openat(3, "new.txt", O_WRONLY | O_CREAT, 0666));
            TRY("open-trunc", openat(3, "file.txt", O_RDONLY | O_TRUNC));
            TRY("truncate", truncate(argv[1], 0));
            TRY("open-write", openat(3, "file.txt", O_WRONLY));
            int fd = TRY("open-read", openat(3, "file.txt", O_RDONLY));
            TRY("ftruncate", ftruncate(fd, 0));
            TRY("mkfifo", mkfifoat(3, "fifo", 0666));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(tree.data / "file.txt"), extra=MOUNTS)
    assert out.lines == [
        "mkdirat EACCES",
        "unlinkat EACCES",
        "rmdir EACCES",
        "creat EACCES",
        "open-trunc EACCES",
        "truncate EACCES",
        "open-write EACCES",
        "open-read ok",
        "ftruncate EINVAL",  # a read-only fd cannot be truncated
        "mkfifo EACCES",
        "done",
    ]
    _untouched(tree)


@attack(
    "chmod, setxattr, utimensat of a file outside every mount",
    "seccomp (path-based metadata calls not allowed; Landlock has no right for them)",
)
def test_metadata_changes_outside_the_mounts(hostile: Hostile, tree: Tree) -> None:
    target = tree.work / "target.txt"
    target.write_text("throwaway")
    target.chmod(0o600)
    hostile.user.own(target)
    before = target.stat()
    prog = hostile.c(
        "metadata",
        """
        #include <sys/time.h>
        #include <sys/xattr.h>
        int main(int argc, char **argv) {
            struct timespec epoch[2] = {{0, 0}, {0, 0}};
            TRY("chmod", chmod(argv[1], 06777));
            TRY("fchmodat", fchmodat(AT_FDCWD, argv[1], 0777, 0));
            TRY("setxattr", setxattr(argv[1], "user.capvisor", "x", 1, 0));
            TRY("lsetxattr", lsetxattr(argv[1], "user.capvisor", "x", 1, 0));
            TRY("removexattr", removexattr(argv[1], "user.capvisor"));
            TRY("utimensat", utimensat(AT_FDCWD, argv[1], epoch, 0));
            TRY("utimes", utimes(argv[1], NULL));
            TRY("chown", chown(argv[1], 0, 0));
            /* Through an O_PATH fd, which Landlock lets anyone open. */
            int fd = open(argv[1], O_PATH);
            TRY("fchmodat2-empty-path", syscall(452 /* fchmodat2 */, fd, "", 0777, AT_EMPTY_PATH));
            TRY("utimensat-empty-path", utimensat(fd, "", epoch, AT_EMPTY_PATH));
            TRY("fsetxattr-o-path", fsetxattr(fd, "user.capvisor", "x", 1, 0));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, str(target), extra=MOUNTS)
    after = target.stat()
    changed = [
        what
        for what, moved in (
            ("mode", after.st_mode != before.st_mode),
            ("mtime", after.st_mtime_ns != before.st_mtime_ns),
            ("xattr", "user.capvisor" in _xattrs(target)),
        )
        if moved
    ]
    assert not changed, (
        f"HOLE: a confined program changed the {', '.join(changed)} of a file outside its "
        f"mounts ({out.lines}). Landlock has no access right for chmod, xattrs or times: "
        "the policy must not allow the path-based calls"
    )
    assert out.lines == [
        *(
            f"{call} EPERM"
            for call in (
                "chmod",
                "fchmodat",
                "setxattr",
                "lsetxattr",
                "removexattr",
                "utimensat",
                "utimes",
                "chown",
                "fchmodat2-empty-path",
                "utimensat-empty-path",
            )
        ),
        "fsetxattr-o-path EBADF",  # the kernel: an O_PATH fd carries no access
        "done",
    ]


def _xattrs(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:
        return []


@attack(
    "create a device node in a read-write mount",
    "Landlock: rw mounts never grant MAKE_CHAR/MAKE_BLOCK; and no CAP_MKNOD (no capabilities, as root neither)",
)
def test_device_node_in_rw_mount(hostile: Hostile, tree: Tree) -> None:
    # /dev/zero's numbers: harmless, and proof that /dev/sda's (8, 0) would work too.
    prog = hostile.c(
        "mknod",
        """
        #include <sys/sysmacros.h>
        int main(void) {
            TRY("mknod-char", mknodat(4, "zero", S_IFCHR | 0666, makedev(1, 5)));
            TRY("mknod-block", mknodat(4, "blk", S_IFBLK | 0666, makedev(7, 255)));
            TRY("open-node", openat(4, "zero", O_RDONLY));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, extra=MOUNTS)
    made = sorted(os.listdir(tree.out))
    assert made == [], (
        f"HOLE: a confined program running as root created device nodes {made} in its rw "
        f"mount ({out.lines}) and can open them (a disk's numbers give raw access to it). "
        "Fix: leave LANDLOCK_ACCESS_FS_MAKE_CHAR and MAKE_BLOCK out of the rw mount rights "
        "(supervisor/landlock.py read_write_rights), and drop the child's capabilities"
    )
    # Landlock answers first (EACCES); without it the missing CAP_MKNOD would (EPERM).
    assert out.lines == ["mknod-char EACCES", "mknod-block EACCES", "open-node ENOENT", "done"]
