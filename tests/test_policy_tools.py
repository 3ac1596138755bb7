"""``capvisor policy check|show|compile|import|diff``, OCI JSON, and the show/filter agreement.

The property test at the end generates random valid policies, compiles
them, and has a real child (spawned by native.spawn under the filter) make
a sample of syscalls: each outcome must be the action ``policy show`` lists
for that syscall and those arguments.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import cli, policy_oci, policy_show
from supervisor import policy as P
from supervisor.errors import PolicyError

from .seccomp_exec import spawn_under

HERE = Path(__file__).resolve().parent
DOCKER = HERE / "data" / "docker-default.json"
SHIPPED = ("default", "compute", "service", "python", "shell")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def keys(policy: P.Policy) -> list[tuple[str, str, str]]:
    return [row.key for row in policy_show.table(policy)]


# -- check ----------------------------------------------------------------------------------


def test_check_accepts_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "policy", "check", *(f"policies/{n}.yaml" for n in SHIPPED))
    assert (code, err) == (0, "")


def test_check_reports_every_problem_with_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            default: EPERM
            allow: [raed, "@file-sytem", socket]
            allow_if:
              socket: {arg0: {any_of: [AF_INETT]}}
            errno: {getpid: EPERM}
            """
        )
    )
    good = tmp_path / "good.yaml"
    good.write_text("allow: [read]\n")
    code, _, err = run_cli(capsys, "policy", "check", str(good), str(bad))
    assert code == 125
    lines = err.strip().splitlines()
    assert f"{bad}:2:9: unknown syscall 'raed'" in lines[0]
    assert any(f"{bad}:2:15: unknown group @file-sytem" in line for line in lines)
    assert any(f"{bad}:4:28: unknown constant 'AF_INETT'" in line for line in lines)
    assert any(f"{bad}:5:9: getpid: EPERM is already the default" in line for line in lines)
    assert all(str(good) not in line for line in lines)


def test_check_refuses_a_plain_allow_next_to_a_conditional_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('allow: ["@socket"]\nallow_if:\n  socket: {arg0: {any_of: [AF_UNIX]}}\n')
    code, _, err = run_cli(capsys, "policy", "check", str(path))
    assert code == 125
    assert f"{path}:3:3: socket is allowed with conditions here and unconditionally" in err
    assert "libseccomp would drop the conditions" in err


def test_check_names_an_include_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("include: b.yaml\nallow: [read]\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    code, _, err = run_cli(capsys, "policy", "check", str(tmp_path / "a.yaml"))
    assert code == 125
    assert f"{tmp_path / 'b.yaml'}:1:10: include cycle" in err


# -- show -----------------------------------------------------------------------------------


def test_show_lists_action_conditions_and_origin(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "policy", "show", "service")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SYSCALL", "ACTION", "CONDITIONS", "FROM"]
    table = {line.split()[0]: line for line in lines[1:]}
    assert re.search(r"^read +allow +- +allow @basic-io \(default\.yaml:\d+:\d+\)$", table["read"])
    assert re.search(r"^bind +EPERM +- +deny \(default\.yaml:\d+:\d+\)$", table["bind"])
    assert re.search(r"^connect +EPERM +- +deny \(service\.yaml:\d+:\d+\)$", table["connect"])
    socketpair = [line for line in lines if line.startswith("socketpair ")]
    assert ["arg0 == 0x1 and arg1 & 0xf == 0x1" in line for line in socketpair] == [True, False]
    assert "arg0 == 0x1 and arg1 & 0xf == 0x5" in socketpair[1]  # SOCK_SEQPACKET
    assert re.search(r"^clone3 +ENOSYS +- +errno", table["clone3"])
    assert re.search(r"^ptrace +EPERM +- +always denied$", table["ptrace"])
    assert lines[-1].split() == ["*", "EPERM", "-", "default"]


def test_show_overridden_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "policy", "show", "--overridden", "--json", "service")
    rows = json.loads(out)
    overridden = next(r for r in rows if r["syscall"] == "connect" and r["action"] == "(allow)")
    assert overridden["origin"].startswith("allow @network-io (default.yaml:")
    assert overridden["origin"].endswith(", overridden")


# -- compile --------------------------------------------------------------------------------


def test_compile_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "f.bpf"
    code, _, _ = run_cli(
        capsys, "policy", "compile", "compute", "--format", "bpf", "-o", str(out_file)
    )
    assert code == 0
    assert out_file.read_bytes() == P.compiled("compute").bpf
    code, out, _ = run_cli(capsys, "policy", "compile", "compute", "--format", "pfc")
    assert '# filter for syscall "openat"' in out
    code, out, _ = run_cli(capsys, "policy", "compile", "compute", "--format", "oci")
    profile = json.loads(out)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    openat = next(s for s in profile["syscalls"] if s["names"] == ["openat"])
    assert openat["args"] == [
        {"index": 2, "value": 0o20000100, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]


def test_compile_oci_refuses_a_policy_that_needs_the_guard(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("allow: [ioctl, read]\n")
    with pytest.raises(PolicyError, match="ioctl allowed unconditionally"):
        policy_oci.export_oci(P.load_policy(str(path)))


@pytest.mark.parametrize("name", SHIPPED)
def test_oci_round_trip_gives_the_same_table(name: str, tmp_path: Path) -> None:
    original = P.load_policy(name)
    exported = json.dumps(policy_oci.export_oci(original))
    imported = policy_oci.import_oci(exported, f"{name}.json")
    assert imported.reported == []
    path = tmp_path / "back.yaml"
    path.write_text(imported.yaml)
    assert keys(P.load_policy(str(path))) == keys(original)
    assert P.compile_policy(P.load_policy(str(path))).bpf == P.compiled(name).bpf


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_podman_accepts_the_oci_export(tmp_path: Path) -> None:  # pragma: no cover - optional
    path = tmp_path / "service.json"
    path.write_text(json.dumps(policy_oci.export_oci(P.load_policy("service"))))
    result = subprocess.run(
        ["podman", "run", "--rm", f"--security-opt=seccomp={path}", "busybox", "true"],
        capture_output=True,
    )
    if b"Error" in result.stderr and b"image" in result.stderr:
        pytest.skip("no busybox image available offline")
    assert result.returncode == 0, result.stderr


# -- import ---------------------------------------------------------------------------------


def test_docker_default_profile_imports_with_its_gated_rules_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "docker.yaml"
    code, _, err = run_cli(capsys, "policy", "import", str(DOCKER), "-o", str(out_file))
    assert code == 0
    # Capability-gated entries are named with their capability, not dropped silently.
    for cap in ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_BOOT", "CAP_SYS_MODULE", "CAP_BPF"):
        assert re.search(rf"syscalls\[\d+\]: not imported, needs {cap}", err), cap
    assert "SCMP_CMP_NE 0x28 cannot be expressed" in err  # socket(!= AF_VSOCK)
    assert "not imported, only for s390, s390x" in err
    assert re.search(r"always denied by capvisor: .*\bptrace\b", err)
    policy = P.load_policy(str(out_file))
    rules = {(r.syscall, str(r.action), r.checks) for r in policy.rules}
    assert ("read", "allow", ()) in rules
    assert ("clone3", "ENOSYS", ()) in rules
    assert ("clone", "allow", (P.ArgCheck(0, 0x7E020000, 0),)) in rules
    assert ("personality", "allow", (P.ArgCheck(0, P.MASK32, 0x20008),)) in rules
    assert "socket" not in policy.allowed()
    assert "mount" not in policy.allowed()
    # And it runs a real program.
    status, out, _ = spawn_under(P.compile_policy(policy).bpf, ["/bin/sh", "-c", "echo ok | cat"])
    assert (status, out) == (0, b"ok\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"defaultAction": "SCMP_ACT_ERRNO",\n "syscalls": [}', "x.json:2:15: "),
        ('{"defaultAction": "SCMP_ACT_ALLOW"}', "x.json: defaultAction: SCMP_ACT_ALLOW"),
        (
            '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read"}]}',
            "x.json: syscalls[0].names: must be a list",
        ),
        (
            '{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], '
            '"action": "SCMP_ACT_ALLOW", "args": [{"value": 1}]}]}',
            "x.json: syscalls[0].args[0]: an argument is an object",
        ),
    ],
)
def test_import_errors_name_the_place(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_oci.import_oci(text, "x.json")
    assert message in str(info.value)


# -- diff -----------------------------------------------------------------------------------


def test_diff(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "policy", "diff", "default", "service")
    assert code == 1
    assert out.splitlines() == [
        "- connect: allow",
        "+ connect: EPERM",
        "- listen: allow",
        "+ listen: EPERM",
    ]
    code, out, _ = run_cli(capsys, "policy", "diff", "service", "service")
    assert (code, out) == (0, "")


def test_policy_errors_in_the_cli_are_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "policy", "show", "no-such-policy")
    assert code == 125 and out == ""
    assert err.startswith("policy 'no-such-policy' not found")
    assert "Traceback" not in err


# -- show and the filter agree ------------------------------------------------------------------

#: Syscalls that are harmless with fd -1: allowed, they fail with EBADF. None
#: of them is one the probe needs to start and print.
FD_CALLS = tuple(
    [
        "dup",
        "fcntl",
        "ioctl",
        "fsync",
        "flock",
        "ftruncate",
        "fchdir",
        "fchmod",
        "fdatasync",
        "getdents64",
        "pwrite64",
        "readv",
        "writev",
        "getpeername",
        "getsockname",
        "shutdown",
        "listen",
        "accept",
        "connect",
        "bind",
        "sendto",
        "recvfrom",
        "setsockopt",
        "getsockopt",
        "fstatfs",
        "inotify_rm_watch",
        "timerfd_gettime",
        "pidfd_getfd",
    ]
)
#: Errnos no allowed call above returns with these arguments.
MARKERS = ("E2BIG", "EXDEV", "ETXTBSY", "ENOTBLK")
#: What the probe needs to start (dynamic loader) and print.
PROBE_NEEDS = '"@default", openat, newfstatat, fstat, read, write, close, pread64, access'

MANY_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
/* many NR A1 NR A1 ...: syscall(NR, -1, A1, 0, 0, 0, 0) each, "RET ERRNO" per line. */
int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        long nr = strtol(argv[i], NULL, 0), a1 = strtol(argv[i + 1], NULL, 0);
        errno = 0;
        long ret = syscall(nr, -1L, a1, 0L, 0L, 0L, 0L);
        printf("%ld %d\n", ret, ret == -1 ? errno : 0);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed")
    out = tmp_path_factory.mktemp("many")
    (out / "many.c").write_text(MANY_C)
    subprocess.run(["gcc", "-O1", "-o", out / "many", out / "many.c"], check=True)
    return out / "many"


def _holds(conditions: str, args: dict[int, int]) -> bool:
    if conditions == "-":
        return True
    for part in conditions.split(" and "):
        m = re.fullmatch(r"arg(\d) (?:& (0x[0-9a-f]+) )?== (0x[0-9a-f]+)", part)
        assert m, part
        mask = int(m[2], 16) if m[2] else P.MASK32
        if args.get(int(m[1]), 0) & mask != int(m[3], 16):
            return False
    return True


def expected_from_show(rows: list[policy_show.Row], name: str, args: dict[int, int]) -> str:
    """The action ``policy show`` lists for one call."""
    for row in rows:
        if row.syscall == name and _holds(row.conditions, args):
            return row.action
    return rows[-1].action  # the default row


@st.composite
def policies(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A random valid policy over a sample of FD_CALLS, and the sample."""
    sample = draw(st.lists(st.sampled_from(FD_CALLS), min_size=4, max_size=10, unique=True))
    default = draw(st.sampled_from(MARKERS))
    plain = [n for n in sample if draw(st.booleans())]
    rest = [n for n in sample if n not in plain]
    conditional = [n for n in rest if draw(st.booleans())]
    errnos = [n for n in rest if n not in conditional and draw(st.booleans())]
    denies = [n for n in plain if draw(st.integers(0, 3)) == 0]
    lines = [f"default: {default}", f"allow: [{', '.join([PROBE_NEEDS, *plain])}]"]
    if conditional:
        lines.append("allow_if:")
        for name in conditional:
            values = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                lines.append(f"  {name}: {{arg1: {{any_of: {values}}}}}")
            else:
                lines.append(f"  {name}: {{arg1: {{eq: {values[0] & 1}, mask: 1}}}}")
    if denies:
        lines.append(f"deny: [{', '.join(denies)}]")
    if errnos:
        lines.append("errno:")
        others = [m for m in MARKERS if m != default]
        lines += [f"  {name}: {draw(st.sampled_from(others))}" for name in errnos]
    return "\n".join(lines) + "\n", sample


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(policies(), st.lists(st.integers(0, 3), min_size=10, max_size=10))
def test_a_child_sees_exactly_what_show_lists(
    many: Path,
    tmp_path_factory: pytest.TempPathFactory,
    generated: tuple[str, list[str]],
    arg1s: list[int],
) -> None:
    text, sample = generated
    directory = tmp_path_factory.mktemp("prop", numbered=True)
    path = directory / "p.yaml"
    path.write_text(text)
    policy = P.load_policy(str(path))
    rows = policy_show.table(policy)
    compiled = P.compile_policy(policy)
    calls = list(zip(sample, arg1s, strict=False))
    argv = [str(many)]
    for name, arg1 in calls:
        argv += [str(P.syscall_number(name)), str(arg1)]
    status, out, err = spawn_under(compiled.bpf, argv)
    assert status == 0, (text, err)
    results = out.decode().splitlines()
    assert len(results) == len(calls), (text, out)
    for (name, arg1), line in zip(calls, results, strict=True):
        _, number = map(int, line.split())
        expected = expected_from_show(rows, name, {0: 0xFFFFFFFF, 1: arg1})
        denied = number in [getattr(errno, m) for m in MARKERS] + [errno.EPERM]
        seen = errno.errorcode[number] if denied else "allow"
        assert seen == expected, (text, name, arg1, line)


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    # `capvisor policy show default --json | true`: a quiet 141, never "internal error".
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "policy", "show", "default", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before capvisor (still importing) writes a byte
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == cli.EXIT_BROKEN_PIPE, stderr
    assert stderr == ""
