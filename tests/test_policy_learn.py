"""Learn mode and audit mode: SECCOMP_RET_USER_NOTIF through capvisor's own spawn path.

- the native hand-over of the listener (native/spawn.c, send_listener);
- ``policy learn`` drafts (the pure Recording) and real runs;
- the issue's end-to-end check: learn a program, run it under the draft,
  remove a syscall it needs, see it fail and the audit event name the call;
- audit answers with the policy's errno and reports in the program's log.

The end-to-end tests run the real ``capvisor`` as root and as uid 65534.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from supervisor import native, policy_learn
from supervisor import policy as P
from supervisor import seccomp_notify as N
from supervisor.errors import SpawnError

from .conftest import PYTHON, Capvisor

PY3 = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(not Path(PY3).exists(), reason=f"{PY3} is needed")


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def cli(capvisor: Capvisor, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``capvisor ARGV`` as the test's user, in its work directory."""
    return subprocess.run(
        [*capvisor.user.prefix(), PYTHON, "-m", "supervisor", *argv],
        capture_output=True,
        text=True,
        cwd=capvisor.work,
        timeout=timeout,
    )


# -- the native hand-over ---------------------------------------------------------------------


def test_listener_reaches_the_parent_and_every_call_is_recorded() -> None:
    before = open_fds()
    request = native.SpawnRequest(
        path="/bin/true",
        argv=["true"],
        env=[],
        fds=[0, 1, 2],
        new_session=False,
        seccomp_bpf=N.recording_program(chan=3),
        seccomp_listener=True,
    )
    child = native.spawn(request)
    assert child.listener >= 0
    assert not os.get_inheritable(child.listener)
    recording = policy_learn.Recording()
    policy_learn._serve(child.listener, recording)
    status = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
    os.close(child.listener)
    os.close(child.pidfd)
    assert (status.si_code, status.si_status) == (os.CLD_EXITED, 0)
    # /bin/true's dynamic loader maps libc; execve and exit_group pass the prefix.
    assert {"mmap", "openat", "brk"} <= set(recording.calls)
    assert "exit_group" not in recording.calls
    assert open_fds() == before


def test_a_failed_spawn_with_a_listener_leaves_nothing_behind(tmp_path: Path) -> None:
    before = open_fds()
    request = native.SpawnRequest(
        path=str(tmp_path / "missing"),
        argv=["missing"],
        env=[],
        fds=[0, 1, 2],
        seccomp_bpf=N.recording_program(chan=3),
        seccomp_listener=True,
    )
    with pytest.raises(SpawnError) as info:
        native.spawn(request)
    assert (info.value.step, info.value.errno) == ("execve", errno.ENOENT)
    assert open_fds() == before


def test_a_listener_needs_a_filter() -> None:
    with pytest.raises(ValueError, match="needs a seccomp program"):
        native.spawn(
            native.SpawnRequest("/bin/true", ["true"], [], [0, 1, 2], seccomp_listener=True)
        )


def test_the_recording_filter_still_denies_the_always_denied_set(cbin_unshare: Path) -> None:
    learned = policy_learn.learn([str(cbin_unshare)])
    assert learned.returncode == errno.EPERM  # unshare() failed with EPERM, unnotified
    assert "unshare" not in learned.recording.calls


@pytest.fixture(scope="module")
def cbin_unshare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed")
    out = tmp_path_factory.mktemp("unshare")
    source = out / "u.c"
    source.write_text(
        "#define _GNU_SOURCE\n#include <errno.h>\n#include <sched.h>\n"
        "int main(void) { return unshare(CLONE_NEWUSER) == 0 ? 0 : errno; }\n"
    )
    subprocess.run(["gcc", "-O1", "-o", out / "u", source], check=True)
    return out / "u"


# -- drafts -----------------------------------------------------------------------------------


def test_a_draft_uses_groups_conditions_and_hints(tmp_path: Path) -> None:
    rec = policy_learn.Recording()
    basic = [m for m in P.GROUPS["@basic-io"].members if P.syscall_number(m) >= 0]
    for name in basic:  # all of @basic-io
        rec.add(name, (0,) * 6)
    rec.add("socket", (2, 1, 0, 0, 0, 0))
    rec.add("socket", (0xFFFFFFFF00000001, 1, 0, 0, 0, 0))  # AF_UNIX, high bits ignored
    rec.add("ioctl", (1, 0x5401, 0, 0, 0, 0))
    rec.add("ioctl", (1, 0x5412, 0, 0, 0, 0))  # TIOCSTI: never drafted
    rec.add("openat", (0xFFFFFF9C, 0, 0, 0, 0, 0))
    rec.add("openat", (5, 0, 0, 0, 0, 0))
    rec.add("clone3", (0,) * 6)
    rec.add("ptrace", (0,) * 6)
    text = rec.draft(["prog", "arg"])
    assert '  - "@basic-io"' in text
    assert "  - read\n" not in text
    assert "  - openat\n" in text
    assert "  socket:\n    - {arg0: {eq: AF_UNIX}, arg1: {eq: SOCK_STREAM, mask: 0xf}}\n" in text
    assert "    - {arg0: {eq: AF_INET}, arg1: {eq: SOCK_STREAM, mask: 0xf}}\n" in text
    assert "ioctl: {arg1: {any_of: [TCGETS]}}" in text
    assert "clone: {arg0: {none_of_mask: [0x7e020080]}}" in text
    assert "  clone3: ENOSYS" in text
    assert "# Always denied, whatever a policy says: ptrace" in text
    assert "# hint: openat was called with AT_FDCWD and a directory fd" in text
    path = tmp_path / "draft.yaml"
    path.write_text(text)
    policy = P.load_policy(str(path))  # a draft always checks
    assert {"read", "openat", "execve", "exit_group"} <= policy.allowed()
    # ... and merges back: a second recording that absorbs it drafts the same.
    again = policy_learn.Recording()
    again.absorb(policy)
    assert P.load_policy(str(path)).rules == policy.rules
    conditions = text.split("allow_if:")[1].split("# Always denied")[0]
    assert again.draft().split("allow_if:")[1] == conditions


def test_learn_merges_runs(tmp_path: Path) -> None:
    first = policy_learn.learn(["/bin/true"])
    (tmp_path / "a.yaml").write_text(first.recording.draft())
    rec = policy_learn.Recording()
    rec.absorb(P.load_policy(str(tmp_path / "a.yaml")))
    second = policy_learn.learn(
        [PY3, "-S", "-c", "import socket; socket.socketpair()"], recording=rec
    )
    assert second.returncode == 0
    (tmp_path / "b.yaml").write_text(rec.draft())
    merged = P.load_policy(str(tmp_path / "b.yaml"))
    assert set(P.load_policy(str(tmp_path / "a.yaml")).allowed()) <= merged.allowed()
    assert "socketpair" in merged.allowed()


# -- the end-to-end check ---------------------------------------------------------------


def test_learn_run_remove_audit(capvisor: Capvisor) -> None:
    capvisor.user.own(capvisor.work)
    learned = cli(capvisor, "policy", "learn", "-o", "p.yaml", "--", PY3, "-c", "print(1)")
    assert learned.returncode == 0, learned.stderr
    assert learned.stdout == "1\n"
    draft = (capvisor.work / "p.yaml").read_text()
    assert "  - openat\n" in draft

    prog = capvisor.describe(
        f"""\
        program: {PY3}
        args: [-c, "print(1)"]
        policy: ./p.yaml
        """
    )
    result = capvisor.run(prog)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rb"\S+ stdout F 1\n", result.log)

    # Without openat the interpreter cannot start; audit names the call.
    (capvisor.work / "q.yaml").write_text(draft.replace("  - openat\n", ""))
    prog_q = capvisor.describe(prog.read_text().replace("p.yaml", "q.yaml"), "q-prog.yaml")
    result = capvisor.run(prog_q, "--audit")
    assert result.returncode != 0
    log = result.log.decode()
    assert re.search(
        r"stderr F capvisor: denied openat\(AT_FDCWD, \"/[^\"]+\", O_RDONLY\|O_CLOEXEC\) "
        r"by policy q: EPERM \(default action\)",
        log,
    ), log
    # Without --audit the same run fails the same way, silently.
    quiet = capvisor.run(prog_q)
    assert quiet.returncode == result.returncode
    assert "denied" not in quiet.log.decode()


# -- audit ------------------------------------------------------------------------------------

AUDITED = """
import os
for i in range(200):
    try:
        os.mkdir("/nonexistent-capvisor/%d" % i)
    except OSError as e:
        print(i, e.errno)
"""


def test_audit_answers_with_the_policys_errno_and_loses_no_line(capvisor: Capvisor) -> None:
    (capvisor.work / "p.yaml").write_text("include: python\nerrno: {mkdir: EXDEV}\n")
    code = textwrap.indent(AUDITED, "    ")
    prog = capvisor.describe(
        f"program: {PY3}\npolicy: ./p.yaml\naudit: true\nargs:\n  - -S\n  - -c\n  - |\n{code}"
    )
    result = capvisor.run(prog)
    assert result.returncode == 0, result.stderr
    records = result.log.decode().splitlines()
    printed = [r.split(" F ", 1)[1] for r in records if " stdout F " in r]
    assert printed == [f"{i} {errno.EXDEV}" for i in range(200)]
    denials = [r for r in records if " stderr F capvisor: denied " in r]
    assert len(denials) == 200
    assert re.search(
        r'denied mkdir\("/nonexistent-capvisor/0", 0o777\) by policy p: EXDEV '
        r"\(errno at .*p\.yaml:2:9\)$",
        denials[0],
    ), denials[0]


def test_audit_is_off_by_default_and_reported(capvisor: Capvisor) -> None:
    prog = capvisor.describe(f"program: {PY3}\nargs: [-c, '0']\n")
    result = capvisor.run(prog, "--report")
    assert '"audit": false' in result.log.decode()
    result = capvisor.run(prog, "--audit", "--report")
    assert '"audit": true' in result.log.decode()


def test_audit_key_must_be_a_boolean(capvisor: Capvisor) -> None:
    prog = capvisor.describe(f"program: {PY3}\naudit: yes please\n")
    result = capvisor.run(prog)
    assert result.returncode == 125
    assert f"{prog}:2:8: audit must be true or false" in result.stderr


def test_audit_event_text() -> None:
    from supervisor import audit

    compiled = P.compiled("compute")
    strings = {0x1000: b"/etc/shadow", 0x2000: b'we"ird\n'}
    denial = audit.describe(
        compiled,
        P.syscall_number("openat"),
        P.NATIVE_ARCH,
        (0xFFFFFF9C, 0x1000, 0o101, 0o644, 0, 0),
        strings.get,
    )
    assert denial.error == errno.EPERM
    assert denial.text.startswith(
        'denied openat(AT_FDCWD, "/etc/shadow", O_WRONLY|O_CREAT, 0o644) by policy compute: EPERM ('
    )
    socket_call = audit.describe(
        compiled, P.syscall_number("socket"), P.NATIVE_ARCH, (2, 0o2000001, 0, 0, 0, 0), strings.get
    )
    assert "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, 0)" in socket_call.text
    mkdir = audit.describe(
        compiled, P.syscall_number("mkdir"), P.NATIVE_ARCH, (0x2000, 0o755, 0, 0, 0, 0), strings.get
    )
    assert 'mkdir("we\\"ird\\x0a", 0o755)' in mkdir.text


def test_audit_names_the_guard_and_always_denied_calls(tmp_path: Path) -> None:
    from supervisor import audit

    path = tmp_path / "g.yaml"
    path.write_text("default: ENOSYS\nallow: [ioctl, ptrace]\n")
    compiled = P.compile_policy(P.load_policy(str(path)))
    tiocsti = audit.describe(
        compiled, P.syscall_number("ioctl"), P.NATIVE_ARCH, (0, 0x5412, 0, 0, 0, 0), {}.get
    )
    assert tiocsti.error == errno.ENOSYS
    assert tiocsti.text.startswith(
        "denied ioctl(0, TIOCSTI, 0x0) by policy g: ENOSYS (always denied"
    )
    ptrace = audit.describe(compiled, P.syscall_number("ptrace"), P.NATIVE_ARCH, (0,) * 6, {}.get)
    assert ptrace.text.endswith(": ENOSYS (always denied)")


def test_audit_filter_keeps_kill_and_only_notifies_errno_returns(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(textwrap.dedent("default: kill\nallow: ['@default']\nerrno: {mkdir: EXDEV}\n"))
    compiled = P.compile_policy(P.load_policy(str(path)))
    program = N.audit_program(compiled, chan=3)
    args = (0,) * 6
    for name, expected in (
        ("mkdir", N.RET_USER_NOTIF),
        ("socket", 0x80000000),
        ("brk", N.RET_ALLOW),
    ):
        assert N.evaluate(program, P.syscall_number(name), P.NATIVE_ARCH, args) == expected, name
    # The prefix lets the spawning child's hand-over through, nothing else.
    sendmsg = P.syscall_number("sendmsg")
    assert (
        N.evaluate(program, sendmsg, P.NATIVE_ARCH, (3, 0, native.LISTENER_MSG_FLAGS, 0, 0, 0))
        == N.RET_ALLOW
    )
    assert (
        N.evaluate(program, sendmsg, P.NATIVE_ARCH, (4, 0, native.LISTENER_MSG_FLAGS, 0, 0, 0))
        == 0x80000000
    )
    assert N.evaluate(program, sendmsg, P.NATIVE_ARCH, (3, 0, 0, 0, 0, 0)) == 0x80000000


def test_only_a_supervised_run_is_audited(tmp_path: Path) -> None:
    from supervisor.description import load_description
    from supervisor.resolve import resolve

    path = tmp_path / "prog.yaml"
    path.write_text(f"program: {PY3}\naudit: true\n")
    plan = resolve(load_description(str(path)))
    try:
        # Spawned directly, nobody would answer the listener: no listener then.
        assert plan.spawn_request().seccomp_listener is False
        assert plan.report()["seccomp"]["audit"] is True
        plan.audit = True  # what run_plan does before it starts answering
        request = plan.spawn_request()
        assert request.seccomp_listener is True
        assert request.seccomp_bpf != plan.compiled_policy.bpf
    finally:
        plan.close()
