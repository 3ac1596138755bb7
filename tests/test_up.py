"""``capvisor up`` and its control commands, as root and as an unprivileged user.

A real supervisor process runs a set file; the tests drive it with the real
CLI (ps, status, start, stop, restart, reload, logs, down), SIGKILL it and
start it again, and check what real children did.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor import control, proctree
from supervisor.upfile import socket_path

from .conftest import PYTHON, User


class Up:
    """A `capvisor up` process on ``work/capvisor.yaml``, run as ``user``."""

    def __init__(self, user: User, work: Path) -> None:
        self.user = user
        self.work = work
        self.file = work / "capvisor.yaml"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, text: str) -> None:
        self.file.write_text(textwrap.dedent(text))
        self.user.own(self.file)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.user.prefix(), PYTHON, "-m", "supervisor", *args],
            capture_output=True,
            text=True,
            cwd=self.work,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"capvisor {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.user.prefix(), PYTHON, "-m", "supervisor", "up"],
            cwd=self.work,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "up.err", "ab"),  # noqa: SIM115
        )
        wait_for(lambda: "control socket" in self.stderr() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        path = self.work / "up.err"
        return path.read_text() if path.exists() else ""

    def status(self, name: str) -> dict:  # type: ignore[type-arg]
        """The program's status, asked over the control socket (faster than the CLI)."""
        answer = control.request(socket_path(self.file), {"op": "status", "name": name})
        return answer["status"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cli("down", check=False)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        """Stop it with `down`; kill it if that did not (a test that failed midway)."""
        self.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    info = proctree.stat(pid)
    return info is not None and info.state != "Z"


@pytest.fixture
def up(as_user: User, work: Path) -> Iterator[Up]:
    as_user.own(work)
    runner = Up(as_user, work)
    yield runner
    runner.close()


SET = """\
programs:
  sleeper:
    program: /bin/sleep
    args: ["1000"]
  talker:
    program: /bin/sh
    args: [-c, 'echo hello from talker; echo oops >&2; exit 3']
    after: [sleeper]
"""


def test_every_control_command(up: Up) -> None:
    up.write(SET)
    up.start()
    sock = next(up.work.glob(".capvisor-capvisor/control.sock"))
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    second = up.cli("up", check=False)
    assert second.returncode == 125 and "already running there" in second.stderr
    wait_for(lambda: up.status("talker")["state"] == "exited")

    ps = up.cli("ps").stdout.splitlines()
    assert ps[0].split()[:4] == ["NAME", "STATE", "PID", "UPTIME"]
    sleeper_row = next(line.split() for line in ps if line.startswith("sleeper"))
    assert sleeper_row[1] == "running" and sleeper_row[2].isdigit()
    talker_row = next(line for line in ps if line.startswith("talker"))
    assert "3 Error" in talker_row and "landlock:" in talker_row

    sleeper = json.loads(up.cli("status", "--json", "sleeper").stdout)
    assert sleeper["state"] == "running" and alive(sleeper["pid"])
    assert sleeper["report"]["seccomp"]["policy"] == "default"
    text = up.cli("status", "talker", check=False)
    assert text.returncode == 1  # not running
    assert "exited with code 3" in text.stdout

    logs = up.cli("logs", "talker")
    assert logs.stdout == "hello from talker\n" and logs.stderr == "oops\n"

    up.cli("stop", "sleeper")
    assert not alive(sleeper["pid"])
    assert up.status("sleeper")["reason"] == "Killed"
    up.cli("start", "sleeper")
    first = up.status("sleeper")["pid"]
    assert alive(first)
    up.cli("restart", "sleeper")
    second = up.status("sleeper")["pid"]
    assert second != first and alive(second) and not alive(first)

    missing = up.cli("stop", "nobody", check=False)
    assert missing.returncode == 125 and "no program 'nobody'" in missing.stderr

    up.cli("down")
    assert up.proc is not None and up.proc.wait(timeout=30) == 0
    assert not alive(second)
    unreachable = up.cli("ps", check=False)
    assert unreachable.returncode == 125 and "is `capvisor up` running?" in unreachable.stderr


def test_reload_starts_new_stops_removed_restarts_changed(up: Up) -> None:
    up.write(
        """\
        programs:
          keep: {program: /bin/sleep, args: ["1000"]}
          change: {program: /bin/sleep, args: ["1000"]}
          drop: {program: /bin/sleep, args: ["1000"]}
        """
    )
    up.start()
    pids = {name: up.status(name)["pid"] for name in ("keep", "change", "drop")}
    up.write(
        """\
        programs:
          keep: {program: /bin/sleep, args: ["1000"]}
          change: {program: /bin/sleep, args: ["2000"]}
          new: {program: /bin/sleep, args: ["1000"]}
        """
    )
    out = up.cli("reload").stdout
    assert "started: new" in out and "stopped: drop" in out and "restarted: change" in out
    assert up.status("keep")["pid"] == pids["keep"] and alive(pids["keep"])
    assert not alive(pids["drop"]) and not alive(pids["change"])
    assert alive(up.status("change")["pid"]) and alive(up.status("new")["pid"])
    assert "drop" not in up.cli("ps").stdout
    assert up.cli("reload").stdout == "nothing changed\n"

    # A broken file changes nothing and says where it is broken.
    up.write('programs:\n  keep: {program: /bin/sleep, args: ["1000"], bogus: 1}\n')
    bad = up.cli("reload", check=False)
    assert bad.returncode == 125
    assert f"{up.file}:2:47: unknown key 'bogus'" in bad.stderr
    assert alive(up.status("new")["pid"])


def test_bad_set_file_is_reported_with_locations(up: Up) -> None:
    up.write(
        """\
        programs:
          a: {program: /bin/true, after: [b]}
          b: {program: /bin/true, after: [a]}
          c: {program: relative}
        """
    )
    out = up.cli("up", check=False)
    assert out.returncode == 125
    assert f"{up.file}:4:16: program must be an absolute path" in out.stderr
    up.write(
        "programs:\n  a: {program: /bin/true, after: [b]}\n  b: {program: /bin/true, after: [a]}\n"
    )
    out = up.cli("up", check=False)
    assert out.returncode == 125 and "'after' forms a cycle: a -> b -> a" in out.stderr


DYING = """\
programs:
  tree:
    program: /bin/sh
    args: [-c, '{script}']
    runtime: [/usr/bin]
    fds:
      out: !mount {{path: {out}, mode: rw}}
"""
SCRIPT = (
    "sleep 1000 & echo $! > {out}/sibling.pid; "
    '(setsid sh -c "echo \\$\\$ > {out}/daemon.pid; exec sleep 1000" &); '
    "exec sleep 1000"
)


def test_sigkill_of_the_supervisor_then_restart(up: Up) -> None:
    out = up.work / "out"
    out.mkdir()
    up.user.own(out)
    up.write(DYING.format(script=SCRIPT.format(out=out), out=out))
    up.start()
    wait_for(lambda: (out / "daemon.pid").exists() and (out / "daemon.pid").read_text())
    main = up.status("tree")["pid"]
    sibling = int((out / "sibling.pid").read_text())
    daemon = int((out / "daemon.pid").read_text())
    assert all(alive(pid) for pid in (main, sibling, daemon))
    time.sleep(2.5)  # let the subreaper record the escaped daemon (no cgroup: a stray)
    assert up.proc is not None
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait()
    # The program itself dies with the supervisor (PR_SET_PDEATHSIG).
    wait_for(lambda: not alive(main), timeout=5)

    (out / "daemon.pid").unlink()
    up.start()
    # What was left (the sibling in its session, the escaped daemon) is killed at restart.
    wait_for(lambda: not alive(sibling) and not alive(daemon), timeout=10)
    status = up.status("tree")
    assert status["state"] == "running" and status["pid"] != main  # started again by `up`
    assert status["reason"] == "SupervisorDied"
    assert "died while this program ran" in status["message"]
    assert "killed at restart" in status["message"]
    ps = up.cli("ps").stdout
    assert "137 SupervisorDied" in ps


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_example_set_file_with_the_switchboard_demo(up: Up, cc: Callable[..., Path]) -> None:
    sbecho = cc("sbecho", (EXAMPLES / "switchboard" / "sbecho.c").read_text())
    for name in ("up.yaml", "hello.yaml", "greeting.txt"):
        (up.work / name).write_text((EXAMPLES / name).read_text())
    (up.work / "switchboard").mkdir()
    server = (EXAMPLES / "switchboard" / "echo-server.yaml").read_text()
    (up.work / "switchboard" / "echo-server.yaml").write_text(
        server.replace("/usr/local/bin/sbecho", str(sbecho))
    )
    up.file.write_text((up.work / "up.yaml").read_text())  # capvisor.yaml: the default name
    for path in up.work.rglob("*"):
        up.user.own(path)
    up.start()
    # It may start before the server registered: then its restart policy retries.
    wait_for(lambda: up.status("echo-client")["phase"] in ("exited", "failed"))
    assert up.status("echo-client")["reason"] == "Completed"
    assert up.cli("logs", "echo-client").stdout.endswith(
        "the server said: hello through the switchboard\n"
    )
    wait_for(lambda: up.status("hello")["state"] == "exited")
    assert "hello from capvisor" in up.cli("logs", "hello").stdout
    assert up.status("echo")["state"] == "running"
    assert up.status("ticker")["state"] == "running"
    assert "no network of my own" in up.cli("logs", "echo").stderr
