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


def header_cdef() -> str:
    """The declarations of spawn.h between its cffi-cdef markers.

    cffi reads the header itself, so there is no second copy of the structs
    to keep in step with it.
    """
    text = (NATIVE / "spawn.h").read_text()
    return text.split("/* cffi-cdef-begin */", 1)[1].split("/* cffi-cdef-end */", 1)[0]


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
    builder.cdef(header_cdef())
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
