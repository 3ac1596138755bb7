"""Landlock rulesets: rights per ABI, the report, fd hygiene, and real denials.

Confinement tests run a probe under a ruleset holding only python3's runtime
set (plus what a test grants) and compare each operation's errno with an
unconfined control or a lower-ABI ruleset, so a denial is told apart from a
harmless failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from supervisor import landlock
from supervisor.errors import ConfinementError, ResolveError
from supervisor.landlock import PathGrant, Ruleset, build_ruleset
from supervisor.runtime import runtime_set

from .landlock_exec import run

ABI = landlock.abi_version()
pytestmark = pytest.mark.skipif(ABI < 1, reason="Landlock is not available on this kernel")

PYTHON = "/usr/bin/python3"
MakeRuleset = Callable[..., Ruleset]

# Runs each [op, args...] of argv[1] (JSON) and prints "ok" or the errno name for each.
PROBE = r"""
import errno, json, os, socket, sys

def do(op, *a):
    if op == "read":
        with open(a[0], "rb") as f:
            f.read(1)
    elif op == "list":
        os.listdir(a[0])
    elif op == "write":
        with open(a[0], "w") as f:
            f.write("x")
    elif op == "mkdir":
        os.mkdir(a[0])
    elif op == "rmdir":
        os.rmdir(a[0])
    elif op == "unlink":
        os.unlink(a[0])
    elif op == "rename":
        os.rename(a[0], a[1])
    elif op == "truncate":
        os.truncate(a[0], 0)
    elif op == "symlink":
        os.symlink(a[0], a[1])
    elif op == "mknod_char":  # /dev/null's numbers
        os.mknod(a[0], 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    elif op == "mkfifo":
        os.mkfifo(a[0])
    elif op == "connect_abstract":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + a[0])
    elif op == "connect_tcp":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.connect((a[0], a[1]))
    elif op == "bind_tcp":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((a[0], a[1]))
    elif op == "kill":
        os.kill(os.getppid() if a[0] == "ppid" else os.getpid() if a[0] == "self" else a[0], 0)
    else:
        raise ValueError(op)

out = []
for op in json.loads(sys.argv[1]):
    try:
        do(*op)
        out.append("ok")
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
print(json.dumps(out))
"""


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def probe(ruleset: Ruleset, ops: Sequence[Sequence[object]]) -> list[str]:
    """Run PROBE under ``ruleset``; the result of each op."""
    proc = run(ruleset.fd, [PYTHON, "-c", PROBE, json.dumps(ops)])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def unconfined(ops: Sequence[Sequence[object]]) -> list[str]:
    proc = subprocess.run(
        [PYTHON, "-c", PROBE, json.dumps(ops)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


@pytest.fixture
def python_ruleset_factory() -> Iterator[MakeRuleset]:
    opened: list[Ruleset] = []

    def make(*grants: PathGrant, abi: int | None = None) -> Ruleset:
        ruleset = build_ruleset([*runtime_set(PYTHON).grants, *grants], abi=abi)
        opened.append(ruleset)
        return ruleset

    yield make
    for ruleset in opened:
        ruleset.close()


# -- rights tables ----------------------------------------------------------


def test_handled_rights_per_abi() -> None:
    abi1 = (1 << 13) - 1
    assert landlock.handled_fs(0) == 0
    assert landlock.handled_fs(1) == abi1
    assert landlock.handled_fs(2) == abi1 | landlock.FS_REFER
    assert landlock.handled_fs(3) == landlock.handled_fs(4) == abi1 | (3 << 13)
    assert landlock.handled_fs(5) == landlock.handled_fs(7) == (1 << 16) - 1
    assert landlock.handled_net(3) == 0
    assert landlock.handled_net(4) == landlock.NET_BIND_TCP | landlock.NET_CONNECT_TCP
    assert landlock.scopes(5) == 0
    assert landlock.scopes(6) == (landlock.SCOPE_ABSTRACT_UNIX_SOCKET | landlock.SCOPE_SIGNAL)


@pytest.mark.parametrize("abi", [1, 3, 5, 7])
def test_grant_rights(abi: int) -> None:
    rx_file = landlock.read_exec_rights(abi, is_dir=False)
    assert rx_file == landlock.FS_EXECUTE | landlock.FS_READ_FILE
    assert landlock.read_exec_rights(abi, is_dir=True) == rx_file | landlock.FS_READ_DIR
    rw_dir = landlock.read_write_rights(abi, is_dir=True)
    assert rw_dir == landlock.handled_fs(abi) & ~landlock.FS_DEVICE_NODES
    assert rw_dir & landlock.FS_MAKE_FIFO and not rw_dir & landlock.FS_MAKE_CHAR
    rw_file = landlock.read_write_rights(abi, is_dir=False)
    assert rw_file & ~landlock.FS_FILE_RIGHTS == 0
    assert rw_file & landlock.FS_WRITE_FILE
    assert bool(rw_file & landlock.FS_TRUNCATE) == (abi >= 3)


# -- building ---------------------------------------------------------------


def test_report_names_rights_scopes_and_reasons(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    grants = [
        PathGrant(str(tmp_path), writable=False, reason="mount data"),
        PathGrant(str(tmp_path / "f"), writable=True, reason="file db"),
    ]
    with build_ruleset(grants) as ruleset:
        report = ruleset.report()
    json.dumps(report)
    assert report["abi"] == ABI
    assert "execute" in report["handled_fs"] and "make_sym" in report["handled_fs"]
    if ABI >= 4:
        assert report["handled_net"] == ["bind_tcp", "connect_tcp"]
    if ABI >= 6:
        assert report["scoped"] == ["abstract_unix_socket", "signal"]
    assert report["rules"][0] == {
        "path": str(tmp_path),
        "rights": ["execute", "read_file", "read_dir"],
        "reason": "mount data",
    }
    file_rule = report["rules"][1]
    assert file_rule["reason"] == "file db"
    # a file gets file rights only (the kernel refuses directory rights on it)
    assert "write_file" in file_rule["rights"] and "make_reg" not in file_rule["rights"]


def test_close_is_idempotent(tmp_path: Path) -> None:
    ruleset = build_ruleset([PathGrant(str(tmp_path), writable=False)])
    fd = ruleset.fd
    assert os.get_inheritable(fd) is False
    ruleset.close()
    assert ruleset.fd == -1 and ruleset.closed
    ruleset.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_missing_path_is_a_resolve_error_and_leaks_no_fd(tmp_path: Path) -> None:
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        grants = [
            PathGrant("/usr/bin", writable=False, reason="program"),
            PathGrant(str(tmp_path), writable=True, fd=dirfd, reason="mount data"),
            PathGrant("/nonexistent/x", writable=False, reason="runtime (description)"),
        ]
        before = fd_count()
        with pytest.raises(ResolveError) as info:
            build_ruleset(grants)
        assert fd_count() == before
        assert info.value.location is None
        assert info.value.message == "runtime path /nonexistent/x: No such file or directory"
        os.fstat(dirfd)  # a caller's fd is never closed
    finally:
        os.close(dirfd)


def test_no_landlock_or_too_new_abi_is_a_confinement_error() -> None:
    before = fd_count()
    with pytest.raises(ConfinementError, match="not available"):
        build_ruleset([], abi=0)
    with pytest.raises(ConfinementError, match="kernel has ABI"):
        build_ruleset([], abi=ABI + 1)
    assert fd_count() == before


def test_ruleset_is_reusable_for_many_spawns() -> None:
    with build_ruleset(runtime_set("/bin/true").grants) as ruleset:
        for _ in range(3):
            assert run(ruleset.fd, ["/bin/true"]).returncode == 0


@pytest.mark.parametrize("abi", range(1, ABI + 1))
def test_every_abi_up_to_the_kernels_works(abi: int) -> None:
    with build_ruleset(runtime_set("/bin/true").grants, abi=abi) as ruleset:
        assert ruleset.abi == abi
        proc = run(ruleset.fd, ["/bin/true"])
        assert proc.returncode == 0, proc.stderr


# -- denials ----------------------------------------------------------------


def test_runtime_set_alone_denies_etc_and_root_listing(python_ruleset_factory: MakeRuleset) -> None:
    ruleset = python_ruleset_factory()
    ops = [["read", "/etc/passwd"], ["list", "/"], ["list", "/tmp"], ["read", "/etc/ld.so.cache"]]
    assert unconfined(ops) == ["ok", "ok", "ok", "ok"]
    assert probe(ruleset, ops) == ["EACCES", "EACCES", "EACCES", "ok"]


def test_read_only_grant(tmp_path: Path, python_ruleset_factory: MakeRuleset) -> None:
    ro = tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    (ro / "file").write_text("data")
    ruleset = python_ruleset_factory(PathGrant(str(ro), writable=False, reason="mount data"))
    ops = [
        ["read", f"{ro}/file"],
        ["list", str(ro)],
        ["write", f"{ro}/new"],
        ["write", f"{ro}/file"],
        ["truncate", f"{ro}/file"],
        ["mkdir", f"{ro}/d"],
        ["unlink", f"{ro}/file"],
        ["rmdir", f"{ro}/sub"],
        ["rename", f"{ro}/file", f"{ro}/moved"],
        ["symlink", "file", f"{ro}/link"],
    ]
    assert probe(ruleset, ops) == ["ok", "ok"] + ["EACCES"] * 8
    assert (ro / "file").read_text() == "data"
    assert sorted(os.listdir(ro)) == ["file", "sub"]


def test_read_write_grant(tmp_path: Path, python_ruleset_factory: MakeRuleset) -> None:
    rw = tmp_path / "rw"
    rw.mkdir()
    ruleset = python_ruleset_factory(PathGrant(str(rw), writable=True, reason="mount data"))
    ops = [
        ["write", f"{rw}/new"],
        ["read", f"{rw}/new"],
        ["truncate", f"{rw}/new"],
        ["mkdir", f"{rw}/d"],
        ["rename", f"{rw}/new", f"{rw}/d/moved"],
        ["unlink", f"{rw}/d/moved"],
        ["rmdir", f"{rw}/d"],
        ["write", f"{tmp_path}/outside"],
    ]
    assert probe(ruleset, ops) == ["ok"] * 7 + ["EACCES"]
    assert os.listdir(rw) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs CAP_MKNOD (root)")
def test_read_write_grant_makes_no_device_nodes(
    tmp_path: Path, python_ruleset_factory: MakeRuleset
) -> None:
    # The probe keeps root's CAP_MKNOD (it is not spawned through capvisor),
    # so only Landlock stands between it and a device node in the rw mount.
    rw = tmp_path / "rw"
    rw.mkdir()
    ruleset = python_ruleset_factory(PathGrant(str(rw), writable=True, reason="mount data"))
    assert probe(ruleset, [["mknod_char", f"{rw}/null"], ["mkfifo", f"{rw}/fifo"]]) == [
        "EACCES",
        "ok",
    ]
    assert unconfined([["mknod_char", f"{tmp_path}/control"]]) == ["ok"]  # root could
    assert sorted(os.listdir(rw)) == ["fifo"]


def test_symlink_pointing_out_grants_nothing(
    tmp_path: Path, python_ruleset_factory: MakeRuleset
) -> None:
    granted, outside = tmp_path / "granted", tmp_path / "outside"
    granted.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (granted / "inside").write_text("i")
    (granted / "out").symlink_to(outside / "secret")
    (granted / "outdir").symlink_to(outside)
    (granted / "in").symlink_to(granted / "inside")
    ruleset = python_ruleset_factory(PathGrant(str(granted), writable=True))
    ops = [
        ["read", f"{granted}/out"],
        ["list", f"{granted}/outdir"],
        ["write", f"{granted}/outdir/new"],
        ["read", f"{granted}/in"],
    ]
    assert probe(ruleset, ops) == ["EACCES", "EACCES", "EACCES", "ok"]


def test_file_grant(tmp_path: Path, python_ruleset_factory: MakeRuleset) -> None:
    (tmp_path / "ro").write_text("r")
    (tmp_path / "rw").write_text("w")
    ruleset = python_ruleset_factory(
        PathGrant(str(tmp_path / "ro"), writable=False),
        PathGrant(str(tmp_path / "rw"), writable=True),
    )
    ops = [
        ["read", f"{tmp_path}/ro"],
        ["write", f"{tmp_path}/ro"],
        ["write", f"{tmp_path}/rw"],
        ["unlink", f"{tmp_path}/rw"],  # a directory right, not granted by a file rule
        ["list", str(tmp_path)],
    ]
    assert probe(ruleset, ops) == ["ok", "EACCES", "ok", "EACCES", "EACCES"]
    assert (tmp_path / "rw").read_text() == "x"


@pytest.fixture
def abstract_listener() -> Iterator[str]:
    name = f"capvisor-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen(8)
        yield name


def test_abstract_unix_socket_is_scoped(
    abstract_listener: str, python_ruleset_factory: MakeRuleset
) -> None:
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} < 6 has no abstract unix socket scope")
    ops = [["connect_abstract", abstract_listener], ["connect_abstract", "capvisor-none"]]
    assert unconfined(ops) == ["ok", "ECONNREFUSED"]
    # an unknown name still gives ECONNREFUSED: EPERM is the scope, not a failed lookup
    assert probe(python_ruleset_factory(), ops) == ["EPERM", "ECONNREFUSED"]
    assert probe(python_ruleset_factory(abi=5), ops) == ["ok", "ECONNREFUSED"]


def test_signals_are_scoped(python_ruleset_factory: MakeRuleset) -> None:
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} < 6 has no signal scope")
    other = subprocess.Popen(["sleep", "60"])
    try:
        ops = [["kill", "ppid"], ["kill", other.pid], ["kill", "self"]]
        assert probe(python_ruleset_factory(), ops) == ["EPERM", "EPERM", "ok"]
        assert probe(python_ruleset_factory(abi=5), ops) == ["ok", "ok", "ok"]
    finally:
        other.kill()
        other.wait()


def test_tcp_is_handled_without_rules(python_ruleset_factory: MakeRuleset) -> None:
    if ABI < 4:
        pytest.skip(f"Landlock ABI {ABI} < 4 does not handle TCP")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        ops = [["connect_tcp", "127.0.0.1", port], ["bind_tcp", "127.0.0.1", 0]]
        assert probe(python_ruleset_factory(), ops) == ["EACCES", "EACCES"]
        assert probe(python_ruleset_factory(abi=3), ops) == ["ok", "ok"]
