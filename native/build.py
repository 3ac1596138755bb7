"""cffi build of the native spawn helper: ``supervisor._native`` (API mode).

Used two ways:

* by setuptools, through ``cffi_modules=["native/build.py:ffibuilder"]`` in
  setup.py (``pip install .``, ``pip install -e .``);
* directly, for development: ``python native/build.py`` (from any directory)
  builds ``supervisor/_native*.so`` in place in the source tree.

API mode compiles a real C extension against ``spawn.h``, so cffi checks the
declarations below against the header at build time, and every call releases
the GIL (cffi's default), so a spawn does not stall other Python threads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
ROOT = NATIVE.parent

# Must agree with native/spawn.h (checked by the compiler).
CDEF = """
enum cv_step {
    CV_STEP_SOCKETPAIR, CV_STEP_CLONE, CV_STEP_SIGNALS, CV_STEP_CGROUP,
    CV_STEP_FDS, CV_STEP_CHDIR, CV_STEP_SETSID, CV_STEP_PDEATHSIG,
    CV_STEP_RLIMITS, CV_STEP_CAPABILITIES, CV_STEP_NO_NEW_PRIVS, CV_STEP_LANDLOCK,
    CV_STEP_SECCOMP,
    CV_STEP_EXECVE, CV_STEP_COUNT
};

struct cv_rlimit {
    int resource;
    uint64_t soft;
    uint64_t hard;
};

struct cv_spawn_args {
    const char *path;
    char *const *argv;
    char *const *envp;
    const int *fds;
    int nfds;
    const char *cwd;
    int new_session;
    const struct cv_rlimit *rlimits;
    int nrlimits;
    int landlock_ruleset_fd;
    const void *seccomp_bpf;
    unsigned int seccomp_len;
    char *listen_pid;
    int seccomp_listener;
    int cgroup_procs_fd;
    int parent_death_signal;
};

#define CV_LISTENER_MSG_FLAGS ...

struct cv_spawn_result {
    int pid;
    int pidfd;
    int step;
    int err;
    int listener;
};

int cv_spawn(const struct cv_spawn_args *a, struct cv_spawn_result *r);
const char *cv_step_name(int step);
"""


def _source_path(base: Path) -> str:
    """spawn.c relative to ``base`` when inside it, else absolute.

    distutils places an object file at ``build_temp/<source path>``, so a
    relative path keeps it inside the build directory.
    """
    source = NATIVE / "spawn.c"
    try:
        return str(source.relative_to(base.resolve()))
    except ValueError:
        return str(source)


def make_builder(base: Path) -> FFI:
    """An FFI builder whose source paths are relative to ``base``, the
    directory the compiler will run in."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "supervisor._native",
        '#include "spawn.h"',
        sources=[_source_path(base)],
        include_dirs=[str(NATIVE)],
        depends=[str(NATIVE / "spawn.h")],
        extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
        # Bind every symbol at load time: the spawned child shares the
        # parent's memory and must never run the lazy PLT resolver.
        extra_link_args=["-Wl,-z,now"],
    )
    return builder


# setuptools runs the build in the project root (setup.py's directory).
ffibuilder = make_builder(Path(os.getcwd()))


def install(built: Path, target: Path) -> None:
    """Put the extension ``built`` at ``target`` by renaming a copy over it.

    Never by rewriting ``target`` in place: a running supervisor has the old
    file mapped, and rewritten pages under a running process crash it. A
    rename leaves the old inode (and its pages) to whoever still maps it.
    Other builds of the same module in that directory are removed.
    """
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(built, partial)
        shutil.copymode(built, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    # A build named for another ABI tag (``pip install -e`` makes
    # _native.abi3.so, a direct build _native.cpython-311-….so) would shadow
    # or be shadowed by this one: the newest build is the only one left.
    module = target.name.split(".", 1)[0]
    for other in target.parent.glob(f"{module}.*.so"):
        if other != target:
            other.unlink(missing_ok=True)


def build_in_place() -> Path:
    """Build under build/cffi/ (generated C, objects) and install the extension
    into supervisor/, next to the Python sources. Returns its path."""
    tmpdir = ROOT / "build" / "cffi"
    built = Path(make_builder(tmpdir).compile(tmpdir=str(tmpdir), verbose=True))
    target = ROOT / "supervisor" / built.name
    install(built, target)
    return target


if __name__ == "__main__":
    print(build_in_place())
