"""The runtime set: real programs start under a ruleset holding only it.

Also the ELF reader (a gcc-built program with a private library found
through ``$ORIGIN``), the never-granted trees, and the cache.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from supervisor import elf, landlock, runtime
from supervisor.errors import (
    ConfinementError,
    ProgramNotExecutable,
    ProgramNotFound,
    ResolveError,
)
from supervisor.landlock import PathGrant, build_ruleset
from supervisor.runtime import runtime_set

from .landlock_exec import run

ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="Landlock is not available on this kernel")

PYENV_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3.11"
VENV_PYTHON = "/tmp/v/bin/python"
STD_PATH = "/usr/local/bin:/usr/bin:/bin"


def skip_unless_exists(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed here")


def run_with_runtime_set(
    cmd: list[str],
    *grants: PathGrant,
    env: dict[str, str] | None = None,
    program: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` under a ruleset of its runtime set (plus ``grants``) only."""
    rs = runtime_set(program or cmd[0], env=env)
    with build_ruleset([*rs.grants, *grants]) as ruleset:
        return run(ruleset.fd, cmd, env=env)


@pytest.fixture(autouse=True)
def _cold_cache() -> Iterator[None]:
    runtime.clear_cache()
    yield
    runtime.clear_cache()


# -- real programs under their runtime set ----------------------------------


@needs_landlock
def test_true() -> None:
    proc = run_with_runtime_set(["/bin/true"])
    assert (proc.returncode, proc.stderr) == (0, "")


@needs_landlock
def test_true_without_its_libraries_fails() -> None:
    # control: the runtime set is what makes it start
    program_only = [g for g in runtime_set("/bin/true").grants if g.reason == "program"]
    with build_ruleset(program_only) as ruleset:
        proc = run(ruleset.fd, ["/bin/true"])
    assert proc.returncode != 0


@needs_landlock
def test_ls_of_a_granted_dir(tmp_path: Path) -> None:
    (tmp_path / "alpha").write_text("")
    (tmp_path / "beta").mkdir()
    proc = run_with_runtime_set(["/bin/ls", str(tmp_path)], PathGrant(str(tmp_path), False))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "alpha\nbeta\n", "")
    denied = run_with_runtime_set(["/bin/ls", "/"])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


@needs_landlock
def test_sh() -> None:
    proc = run_with_runtime_set(["/bin/sh", "-c", "echo hi"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "hi\n", "")


PYTHONS = [
    pytest.param("/usr/bin/python3", id="debian"),
    pytest.param(PYENV_PYTHON, id="pyenv"),
    pytest.param(VENV_PYTHON, id="venv"),
]


@needs_landlock
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("env", [{}, {"LANG": "C.UTF-8"}], ids=["no-locale", "C.UTF-8"])
def test_python_imports_json_and_ssl(python: str, env: dict[str, str]) -> None:
    skip_unless_exists(python)
    proc = run_with_runtime_set([python, "-c", "import json, ssl; print(1)"], env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1\n", "")


@needs_landlock
def test_venv_python_sees_its_site_packages() -> None:
    skip_unless_exists(VENV_PYTHON)
    code = "import sys, ruamel.yaml; print(sys.prefix)"
    proc = run_with_runtime_set([VENV_PYTHON, "-c", code])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "/tmp/v\n", "")


@needs_landlock
def test_sh_script(tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/sh\necho "script $1"\n')
    script.chmod(0o755)
    proc = run_with_runtime_set([str(script), "arg"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "script arg\n", "")


@needs_landlock
def test_env_python_script(tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    env = {"PATH": STD_PATH}
    rs = runtime_set(str(script), env=env)
    assert [g.reason for g in rs.grants[:3]] == ["program", "interpreter", "interpreter"]
    assert rs.grants[1].path == os.path.realpath("/usr/bin/env")
    proc = run_with_runtime_set([str(script), "x"], env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, '["x"]\n', "")


# -- what is in the set -----------------------------------------------------


def paths_and_reasons(
    program: str, *, env: dict[str, str] | None = None, extra: Sequence[str] = ()
) -> dict[str, str]:
    return {g.path: g.reason for g in runtime_set(program, env=env, extra=extra).grants}


def test_true_contents() -> None:
    got = paths_and_reasons("/bin/true")
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    assert got == {
        os.path.realpath("/bin/true"): "program",
        os.path.realpath("/lib64/ld-linux-x86-64.so.2"): "interpreter",
        "/etc/ld.so.cache": "loader cache",
        libc: "library",
        **{path: "harmless device" for path, _ in runtime.HARMLESS_DEVICES},
    }
    report = runtime_set("/bin/true").report()
    assert report[0] == {"path": os.path.realpath("/bin/true"), "kind": "file", "reason": "program"}


@pytest.mark.parametrize("python", ["/usr/bin/python3", PYENV_PYTHON, VENV_PYTHON])
def test_python_contents(python: str) -> None:
    skip_unless_exists(python)
    rs = runtime_set(python)
    got = {g.path: g.reason for g in rs.grants}
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))
    assert got[f"{prefix}/lib/python3.11"].startswith("interpreter library tree")
    libs = {os.path.basename(p).split(".so")[0] for p in got}
    assert {"libssl", "libcrypto", "libffi", "libz"} <= libs
    if python == VENV_PYTHON:
        assert got["/tmp/v/pyvenv.cfg"] == "venv config"
        assert got["/tmp/v/lib/python3.11/site-packages"] == "venv site-packages"
    if python == PYENV_PYTHON:
        assert got[f"{prefix}/lib/libpython3.11.so.1.0"] == "library"
    assert rs.unresolved == ()


NEVER = ("/", "/etc", "/home", "/root", "/tmp", "/dev", "/dev/shm", "/proc")


@pytest.mark.parametrize("program", ["/bin/true", "/bin/sh", "/usr/bin/python3", VENV_PYTHON])
def test_never_whole_trees(program: str) -> None:
    skip_unless_exists(program)
    for grant in runtime_set(program, env={"LANG": "C.UTF-8"}).grants:
        real = os.path.realpath(grant.path)
        assert real not in NEVER
        for never in NEVER[1:]:
            assert not never.startswith(real + "/"), grant
        if real.startswith("/etc/"):
            assert real == "/etc/ld.so.cache"
        assert not real.startswith(("/proc/", "/home/"))
        if real.startswith("/dev/"):
            assert (real, grant.writable) in runtime.HARMLESS_DEVICES
        if real.startswith("/root/"):
            assert real.startswith("/root/.pyenv/versions/3.11.7/"), grant


def test_locale_only_for_a_real_locale() -> None:
    assert runtime.LOCALE_DIR not in paths_and_reasons("/bin/true")
    assert runtime.LOCALE_DIR not in paths_and_reasons("/bin/true", env={"LANG": "C"})
    assert runtime.LOCALE_DIR not in paths_and_reasons("/bin/true", env={"LC_ALL": "POSIX"})
    if os.path.isdir(runtime.LOCALE_DIR):
        with_locale = paths_and_reasons("/bin/true", env={"LC_CTYPE": "C.UTF-8"})
        assert with_locale[runtime.LOCALE_DIR] == "locale"


def test_extra_paths(tmp_path: Path) -> None:
    got = paths_and_reasons("/bin/true", extra=["/usr/share/zoneinfo", "/nonexistent/lib"])
    assert got["/usr/share/zoneinfo"] == got["/nonexistent/lib"] == "runtime (description)"
    with pytest.raises(ResolveError) as info:
        build_ruleset(runtime_set("/bin/true", extra=["/nonexistent/lib"]).grants)
    assert info.value.message == "runtime path /nonexistent/lib: No such file or directory"


@pytest.mark.parametrize("path", ["/", "/etc", "/etc/", "/root", "/tmp", "/home", "/proc/self"])
def test_extra_never_whole_trees(path: str) -> None:
    with pytest.raises(ResolveError, match="never part of the runtime set"):
        runtime_set("/bin/true", extra=[path])


def test_extra_below_a_never_tree_is_allowed(tmp_path: Path) -> None:
    assert paths_and_reasons("/bin/true", extra=[str(tmp_path)])[str(tmp_path)] == (
        runtime.REASON_EXTRA
    )


# -- errors -----------------------------------------------------------------


def test_missing_and_unusable_programs(tmp_path: Path) -> None:
    with pytest.raises(ProgramNotFound, match="program /nonexistent/prog: No such file"):
        runtime_set("/nonexistent/prog")
    with pytest.raises(ProgramNotExecutable, match="not a regular file"):
        runtime_set(str(tmp_path))
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ProgramNotExecutable, match="not executable"):
        runtime_set(str(plain))
    script = tmp_path / "s"
    script.write_text("#!/nonexistent/interp\n")
    script.chmod(0o755)
    with pytest.raises(ProgramNotFound, match="interpreter /nonexistent/interp"):
        runtime_set(str(script))


def test_interpreter_depth_limit(tmp_path: Path) -> None:
    previous = "/bin/sh"
    for i in range(6):
        script = tmp_path / f"s{i}"
        script.write_text(f"#!{previous}\n")
        script.chmod(0o755)
        previous = str(script)
        if i < 3:
            assert len(runtime_set(previous).grants) >= 2
    with pytest.raises(ProgramNotExecutable, match="levels of #! interpreters"):
        runtime_set(previous)


def elf_header(elf_class: int, data: int = 1, machine: int = 3) -> bytes:
    ident = b"\x7fELF" + bytes([elf_class, data, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, machine, 1) + bytes(40)


def test_32_bit_programs_are_rejected_clearly(tmp_path: Path) -> None:
    prog = tmp_path / "prog32"
    prog.write_bytes(elf_header(elf.ELFCLASS32))
    prog.chmod(0o755)
    with pytest.raises(ConfinementError, match=r"ELFCLASS32 \(32-bit\).*only ELF64 little-endian"):
        runtime_set(str(prog))
    with pytest.raises(elf.ElfError, match="not an ELF file"):
        elf.read_identity(b"#!/bin/sh\n" + bytes(20))


# -- ELF search: a gcc-built program with private libraries -----------------


def build(tmp_path: Path, *, new_dtags: bool) -> Path:
    """tmp/prog (rpath $ORIGIN/lib) -> tmp/lib/libpriv.so -> libdep.so (no rpath of its own)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "dep.c").write_text("int dep(void) { return 41; }\n")
    (tmp_path / "priv.c").write_text("int dep(void);\nint priv(void) { return dep() + 1; }\n")
    (tmp_path / "main.c").write_text(
        '#include <stdio.h>\nint priv(void);\nint main(void) { printf("%d\\n", priv()); }\n'
    )
    dtags = "--enable-new-dtags" if new_dtags else "--disable-new-dtags"

    def gcc(*args: str) -> None:
        subprocess.run(["gcc", *args], cwd=tmp_path, check=True, capture_output=True)

    gcc("-shared", "-fPIC", "-o", "lib/libdep.so", "dep.c")
    gcc("-shared", "-fPIC", "-o", "lib/libpriv.so", "priv.c", "-Llib", "-ldep")
    gcc(
        "-o", "prog", "main.c", "-Llib", "-lpriv", f"-Wl,{dtags},-rpath,$ORIGIN/lib,-rpath-link,lib"
    )
    return tmp_path / "prog"


def test_rpath_origin_private_libraries(tmp_path: Path) -> None:
    prog = build(tmp_path, new_dtags=False)
    info = elf.read_elf(str(prog))
    assert info.rpath == "$ORIGIN/lib" and info.runpath is None
    assert info.needed[0] == "libpriv.so"
    got = paths_and_reasons(str(prog))
    # DT_RPATH is inherited: libpriv's own dependency is found through the program's
    assert got[f"{tmp_path}/lib/libpriv.so"] == got[f"{tmp_path}/lib/libdep.so"] == "library"
    if ABI >= 1:
        proc = run_with_runtime_set([str(prog)])
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "42\n", "")


def test_runpath_origin_is_not_inherited(tmp_path: Path) -> None:
    prog = build(tmp_path, new_dtags=True)
    info = elf.read_elf(str(prog))
    assert info.runpath == "$ORIGIN/lib" and info.rpath is None
    rs = runtime_set(str(prog))
    got = {g.path for g in rs.grants}
    assert f"{tmp_path}/lib/libpriv.so" in got
    # like ld.so: DT_RUNPATH serves the program's own DT_NEEDED only
    assert f"{tmp_path}/lib/libdep.so" not in got
    assert rs.unresolved == (f"library libdep.so needed by {tmp_path}/lib/libpriv.so: not found",)
    unconfined = subprocess.run([str(prog)], capture_output=True, text=True, check=False)
    assert unconfined.returncode == 127 and "libdep.so" in unconfined.stderr


def test_wrong_class_candidates_are_skipped(tmp_path: Path) -> None:
    prog = build(tmp_path, new_dtags=False)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "libpriv.so").write_bytes(elf_header(elf.ELFCLASS32))
    got = paths_and_reasons(str(prog), env={"LD_LIBRARY_PATH": str(decoy)})
    assert f"{tmp_path}/lib/libpriv.so" in got and f"{decoy}/libpriv.so" not in got


def test_ld_library_path_is_searched(tmp_path: Path) -> None:
    prog = build(tmp_path, new_dtags=True)
    got = paths_and_reasons(str(prog), env={"LD_LIBRARY_PATH": f"{tmp_path}/lib"})
    assert f"{tmp_path}/lib/libdep.so" in got


# -- the cache --------------------------------------------------------------


def test_cache_hits_and_invalidation(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    first = runtime_set(str(script))
    assert runtime_set(str(script)) is first
    assert runtime_set(str(script), env={"LANG": "C.UTF-8"}) is not first
    os.utime(script, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert runtime_set(str(script)) is not first
