"""Hostile confined programs against the switchboard broker.

Each attack is a Python program run by `capvisor run --switchboard` under
the default description and policy, holding only the handle its tag gives
it (``!client`` or ``!server``). It tries to use the handle beyond its
rights, to widen it, to take a label it was not given, or to starve other
clients; it prints what the broker answered, and the test checks from
outside (with its own handles and real servers) that nothing it tried
worked. The broker is a real `capvisor switchboard serve`, run as the same
user as the supervisor; the servers are tests/switchboard_peer.py.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest

from ..conftest import PYTHON, Capvisor
from ..test_switchboard import ROOT, Board, talk
from .harness import Outcome, Snapshot, assert_healthy, attack

#: Lets a confined Python program import the client module (docs/switchboard.md).
RUNTIME = f"env: {{PYTHONPATH: {ROOT}}}\nruntime: [{ROOT}/supervisor]\n"

PRELUDE = """\
import sys
from supervisor.switchboard_client import Handle, SwitchboardError

def attempt(what, call):
    try:
        result = call()
    except SwitchboardError as exc:
        print(what, exc.code, flush=True)
        return None
    print(what, "ok", flush=True)
    return result

handle = Handle.from_listen_fds("board")
"""


@pytest.fixture
def board(capvisor: Capvisor) -> Iterator[Board]:
    capvisor.user.own(capvisor.work)
    b = Board(capvisor.work, capvisor.user)
    yield b
    b.close()


def _description(code: str, fds: str, name: str, *args: str) -> str:
    argv = ["-c", PRELUDE + textwrap.dedent(code), *args]
    return f"name: {name}\nprogram: {PYTHON}\nargs: {json.dumps(argv)}\n{RUNTIME}fds:\n{fds}"


def run_hostile(
    capvisor: Capvisor, board: Board, code: str, fds: str, *, name: str = "mallory"
) -> Outcome:
    """Run ``code`` confined with the handles ``fds`` names; check the supervisor's health."""
    path = capvisor.describe(_description(code, fds, name), f"{name}.yaml")
    result = capvisor.run(path, "--switchboard", board.path)
    outcome = Outcome(result.returncode, result.stdout, result.stderr)
    assert_healthy(outcome, 0)
    return outcome


@attack(
    "switchboard: a `!client` handle tries server_start, list and constrain",
    "switchboard rights (checked on every request)",
)
def test_client_handle_beyond_its_rights(capvisor: Capvisor, board: Board) -> None:
    board.peer("echo", "echo", "service=echo")
    out = run_hostile(
        capvisor,
        board,
        """
        print("rights", *handle.info()["rights"])
        attempt("server_start", lambda: handle.server_start({"service": "echo"}))
        attempt("list", lambda: handle.list())
        attempt("constrain", lambda: handle.constrain(["client_connect"]))
        conn = attempt("client_connect", lambda: handle.client_connect())
        conn.socket.sendall(b"legit"); conn.socket.shutdown(1)
        print("reply", conn.socket.recv(100).decode())
        """,
        "  board: !client {service: echo}\n",
    )
    assert out.lines == [
        "rights client_connect",
        "server_start permission",
        "list permission",
        "constrain permission",
        "client_connect ok",
        "reply echo:legit",
    ]
    # Nothing was registered: clients still reach the one real echo server only.
    with board.handle() as root:
        assert [g["labels"] for g in root.list()] == [{"service": "echo"}]


@attack(
    "switchboard: constrain to widen rights or to overwrite a fixed label",
    "switchboard rights and labels (only added, never replaced)",
)
def test_constrain_cannot_widen_or_relabel(capvisor: Capvisor, board: Board) -> None:
    # A handle that may constrain (the test derives it: confined programs get
    # none from their tags) with a fixed in-label, passed to the program as an fd.
    with board.handle() as root:
        narrow = root.constrain(["server_start", "constrain"], {"team": "blue"}, {"team": "blue"})
        with narrow:
            fd = narrow.socket.fileno()
            path = capvisor.describe(
                _description(
                    """
                    for rights in (["client_connect"], ["list"], ["server_start", "list"]):
                        attempt("widen " + "+".join(rights), lambda: handle.constrain(rights))
                    attempt("relabel in", lambda: handle.constrain(in_labels={"team": "red"}))
                    attempt("relabel out", lambda: handle.constrain(out_labels={"team": "red"}))
                    attempt("serve as red", lambda: handle.server_start({"team": "red"}))
                    child = attempt("narrow", lambda: handle.constrain(["server_start"]))
                    info = child.info()
                    print("child", info["rights"], info["in_labels"])
                    attempt("child widen", lambda: child.constrain(["server_start", "constrain"]))
                    attempt("child serve as red", lambda: child.server_start({"team": "red"}))
                    """,
                    f"  board: !fd {fd}\n",
                    "mallory",
                ),
                "mallory.yaml",
            )
            result = capvisor.run(path, pass_fds=[fd])
            outcome = Outcome(result.returncode, result.stdout, result.stderr)
            assert_healthy(outcome, 0)
        assert outcome.lines == [
            "widen client_connect permission",
            "widen list permission",
            "widen server_start+list permission",
            "relabel in conflict",
            "relabel out conflict",
            "serve as red conflict",
            "narrow ok",
            "child ['server_start'] {'team': 'blue'}",
            "child widen permission",
            "child serve as red conflict",
        ]
        assert root.list({"team": "red"}) == []


@attack(
    "switchboard: a `!server` program impersonates another server's identity label",
    "switchboard identity labels (fixed by the supervisor)",
)
def test_server_cannot_take_another_identity(capvisor: Capvisor, board: Board) -> None:
    board.peer("echo", "vault", "service=vault", "program=vault")
    out = run_hostile(
        capvisor,
        board,
        """
        print("in_labels", sorted(handle.info()["in_labels"].items()))
        attempt("as vault", lambda: handle.server_start({"program": "vault"}))
        attempt("as nobody", lambda: handle.server_start({"program": ""}))
        listener = attempt("as itself", lambda: handle.server_start({"service": "vault"}))
        print("labels", sorted(listener.labels.items()))
        """,
        "  board: !server {service: vault}\n",
    )
    assert out.lines == [
        "in_labels [('program', 'mallory'), ('service', 'vault')]",
        "as vault conflict",
        "as nobody conflict",
        "as itself ok",
        "labels [('program', 'mallory'), ('service', 'vault')]",
    ]
    with board.handle() as root:
        assert talk(root, {"service": "vault", "program": "vault"}, b"secret") == b"vault:secret"
    # The tag itself may not name an identity label either: refused before the start.
    path = capvisor.describe(
        f"name: mallory\nprogram: {PYTHON}\nargs: [-c, pass]\n"
        "fds:\n  board: !server {service: vault, program: vault}\n",
        "mallory.yaml",
    )
    result = capvisor.run(path, "--switchboard", board.path)
    assert result.returncode == 125, result.stderr
    assert (
        "mallory.yaml:5:10: !server: program: identity labels {program: mallory} "
        "cannot be overridden" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


FLOOD = """
import errno, json, os, socket, time
# Pipelined requests, never reading a reply, as fast as the socket takes them:
# to a server that never accepts, and to none at all.
sock = handle.socket
sock.setblocking(False)
sent = 0
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    for labels in ({"service": "stall"}, {"service": "nowhere"}):
        msg = {"v": 2, "op": "client_connect", "id": sent, "labels": labels}
        try:
            sock.send(json.dumps(msg).encode())
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
print("flooded", sent > 100, flush=True)
"""


@attack(
    "switchboard: a flood of connect requests from one handle",
    "switchboard: one task per handle, bounded accept wait",
)
def test_connect_flood_does_not_starve_another_client(capvisor: Capvisor, board: Board) -> None:
    board.peer("echo", "echo", "service=echo")
    board.peer("stall", "stall", "service=stall")
    with board.handle() as root:
        assert talk(root, {"service": "echo"}) == b"echo:hi"
        before = Snapshot.take(board.broker.pid)
    seconds = 4.0
    path = capvisor.describe(
        _description(FLOOD, "  board: !client {}\n", "flood", str(seconds)), "flood.yaml"
    )
    flood = capvisor.popen(
        path, "--switchboard", board.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    slowest = 0.0
    talks = 0
    try:
        time.sleep(0.5)  # the flood is under way
        assert flood.poll() is None, flood.communicate()
        with board.handle() as good:
            while flood.poll() is None:
                start = time.monotonic()
                assert talk(good, {"service": "echo"}, b"served") == b"echo:served"
                slowest = max(slowest, time.monotonic() - start)
                talks += 1
                time.sleep(0.05)
        log, stderr = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    outcome = Outcome(flood.returncode, log, stderr.decode(errors="replace"))
    assert_healthy(outcome, 0)
    assert outcome.lines == ["flooded True"]
    assert talks >= 10, talks
    # The broker's accept timeout is 1 s; a well-behaved client never waited for it.
    assert slowest < 0.5, f"a good client waited {slowest:.2f} s during the flood"
    # Once the flooder is gone the broker drops its handle and every queued request.
    deadline = time.monotonic() + 30
    while (leaks := before.leaks(Snapshot.take(board.broker.pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leaks, leaks
