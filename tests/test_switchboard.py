"""The switchboard broker as a real process (`capvisor switchboard serve`).

Servers are real processes (tests/switchboard_peer.py) or the test's own
sockets; every behaviour is proven by bytes that travel over the handed-out
connections, never by looking at the broker's state.
"""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.switchboard_client import Handle
from supervisor.switchboard_protocol import (
    ProtocolError,
    SwitchboardError,
    decode_object,
    encode,
)

from .conftest import IS_ROOT, NOBODY, PYTHON, User

PEER = str(Path(__file__).with_name("switchboard_peer.py"))
ROOT = str(Path(__file__).parent.parent)
ACCEPT_TIMEOUT = 1.0


def _wait_line(proc: subprocess.Popen[str], stream: str, word: str) -> str:
    pipe = getattr(proc, stream)
    line = pipe.readline()
    if word not in line:
        proc.kill()
        rest = pipe.read()
        raise AssertionError(f"expected {word!r}, got {line!r} {rest!r}")
    return line


class Board:
    """A broker process and the peers the test started on it."""

    def __init__(self, work: Path, user: User | None = None, nofile: int | None = None) -> None:
        self.path = str(work / "board.sock")
        self.procs: list[subprocess.Popen[str]] = []
        prefix = user.prefix() if user else []
        if nofile is not None:
            prefix = ["prlimit", f"--nofile={nofile}", "--", *prefix]
        self.broker = subprocess.Popen(
            [
                *prefix,
                PYTHON,
                "-m",
                "supervisor",
                "switchboard",
                "serve",
                self.path,
                "--accept-timeout",
                str(ACCEPT_TIMEOUT),
            ],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        _wait_line(self.broker, "stderr", "serving")

    def peer(self, mode: str, name: str, *labels: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, PEER, self.path, mode, name, *labels],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.procs.append(proc)
        _wait_line(proc, "stdout", "ready")
        return proc

    def handle(self) -> Handle:
        return Handle.connect(self.path, timeout=10)

    def close(self) -> None:
        for proc in [*self.procs, self.broker]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def board(work: Path) -> Iterator[Board]:
    b = Board(work)
    yield b
    b.close()


def talk(handle: Handle, labels: dict[str, str], data: bytes = b"hi") -> bytes:
    """Connect, send ``data``, half-close, and read the whole answer."""
    conn = handle.client_connect(labels)
    with conn.socket as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def refused(handle: Handle, op: str, **fields: object) -> SwitchboardError:
    with pytest.raises(SwitchboardError) as caught:
        handle.call(op, **fields)
    return caught.value


# -- the root socket ---------------------------------------------------------


def test_root_socket_is_0600_removed_on_exit_and_not_stolen(work: Path) -> None:
    b = Board(work)
    try:
        mode = os.stat(b.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        second = subprocess.run(
            [PYTHON, "-m", "supervisor", "switchboard", "serve", b.path],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert second.returncode == 125
        assert f"switchboard socket {b.path}: another switchboard is serving there" in second.stderr
    finally:
        b.close()
    assert b.broker.returncode == 0
    assert not os.path.exists(b.path)
    # A stale socket file (its broker was killed) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(b.path)
    stale.close()
    again = Board(work)
    try:
        assert again.handle().info()["rights"]
    finally:
        again.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to try the socket as another user")
def test_another_user_cannot_reach_the_root_socket(board: Board) -> None:
    probe = (
        "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
        f"s.connect({board.path!r})"
    )
    other = subprocess.run(
        [*User("nobody", NOBODY).prefix(), PYTHON, "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert other.returncode != 0
    assert "PermissionError" in other.stderr


# -- matching, replicas, ambiguity -------------------------------------------


def test_a_client_reaches_the_server_its_labels_match(board: Board) -> None:
    board.peer("echo", "api", "service=api", "tier=prod")
    board.peer("echo", "db", "service=db")
    with board.handle() as handle:
        assert talk(handle, {"service": "api"}) == b"api:hi"
        assert talk(handle, {"service": "db"}, b"select") == b"db:select"
        # {tier: prod} also merges with {service: db}, which has no tier.
        with pytest.raises(SwitchboardError, match="ambiguous"):
            handle.client_connect({"tier": "prod"})
        conn = handle.client_connect({"service": "api", "caller": "me"})
        conn.close()
        assert conn.labels == {"service": "api", "tier": "prod", "caller": "me"}
        with pytest.raises(SwitchboardError) as caught:
            handle.client_connect({"service": "web"})
        assert caught.value.code == "no_match"
        assert "no matching server for {service: web}" in str(caught.value)
        with pytest.raises(SwitchboardError) as caught:
            handle.client_connect({"service": "api", "tier": "dev"})
        assert caught.value.code == "no_match"


def test_replicas_share_the_load_round_robin(board: Board) -> None:
    for name in ("r1", "r2", "r3"):
        board.peer("echo", name, "service=api")
    with board.handle() as handle:
        answers = [talk(handle, {"service": "api"}) for _ in range(6)]
        (group,) = handle.list()
    assert answers[:3] == answers[3:]
    assert sorted(answers[:3]) == [b"r1:hi", b"r2:hi", b"r3:hi"]
    assert group["replicas"] == 3 and group["connections"] == 6


def test_ambiguity_is_an_error_naming_the_labels_to_add(board: Board) -> None:
    board.peer("echo", "one", "service=api", "instance=1")
    board.peer("echo", "two", "service=api", "instance=2")
    with board.handle() as handle:
        with pytest.raises(SwitchboardError) as caught:
            handle.client_connect({"service": "api"})
        assert caught.value.code == "ambiguous"
        assert "add one of the labels [instance=1, instance=2]" in caught.value.message
        assert talk(handle, {"service": "api", "instance": "2"}) == b"two:hi"


# -- rights and constrain ----------------------------------------------------


def test_constrain_narrows_rights_and_adds_labels(board: Board) -> None:
    board.peer("echo", "api", "service=api")
    board.peer("echo", "db", "service=db")
    with board.handle() as root:
        client = root.constrain(
            rights=["client_connect", "constrain"], out_labels={"service": "api"}
        )
        assert client.info() == {
            "rights": ["client_connect", "constrain"],
            "in_labels": {},
            "out_labels": {"service": "api"},
        }
        assert talk(client, {}) == b"api:hi"
        # Its labels are fixed: asking for another service conflicts.
        error = refused(client, "client_connect", labels={"service": "db"})
        assert error.code == "conflict"
        assert "service: 'api' vs 'db'" in error.message
        # Constraining again: only narrower, only more labels.
        error = refused(client, "constrain", rights=["client_connect", "list"])
        assert error.code == "permission" and "['list']" in error.message
        error = refused(client, "constrain", out_labels={"service": "db"})
        assert error.code == "conflict"
        narrower = client.constrain(rights=["client_connect"], out_labels={"tier": "x"})
        assert narrower.info()["out_labels"] == {"service": "api", "tier": "x"}
        error = refused(narrower, "constrain")
        assert error.code == "permission"
        for h in (client, narrower):
            h.close()


def test_rights_are_checked_on_every_operation(board: Board) -> None:
    with board.handle() as root:
        server = root.constrain(rights=["server_start"], in_labels={"program": "p"})
        client = root.constrain(rights=["client_connect"])
        lister = root.constrain(rights=["list"])
        for handle, ops in (
            (server, ["client_connect", "list", "constrain"]),
            (client, ["server_start", "list", "constrain"]),
            (lister, ["server_start", "client_connect", "constrain"]),
        ):
            for op in ops:
                error = refused(handle, op)
                assert error.code == "permission", op
                assert f"this handle may not {op}" in error.message
        # A server handle's in-labels cannot be overridden.
        error = refused(server, "server_start", labels={"program": "other"})
        assert error.code == "conflict"
        listener = server.server_start({"service": "x"})
        assert listener.labels == {"program": "p", "service": "x"}
        assert lister.list() == [
            {
                "labels": {"program": "p", "service": "x"},
                "replicas": 1,
                "backlog": 0,
                "connections": 0,
            }
        ]
        assert lister.list({"service": "y"}) == []
        listener.close()
        for h in (server, client, lister):
            h.close()


# -- servers going away, stalling, refusing ----------------------------------


def test_a_dead_server_is_pruned(board: Board) -> None:
    lone = board.peer("echo", "lone", "service=lone")
    first = board.peer("echo", "first", "service=api")
    board.peer("echo", "second", "service=api")
    with board.handle() as handle:
        lone.kill()
        first.kill()
        lone.wait()
        first.wait()
        deadline = time.monotonic() + 5
        while handle.list({"service": "lone"}) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handle.list({"service": "lone"}) == []
        with pytest.raises(SwitchboardError, match="no matching server"):
            handle.client_connect({"service": "lone"})
        assert {talk(handle, {"service": "api"}) for _ in range(4)} == {b"second:hi"}


def test_a_stalled_server_times_out_without_stalling_others(board: Board) -> None:
    board.peer("stall", "stuck", "service=stuck")
    board.peer("echo", "fine", "service=fine")
    outcome: dict[str, object] = {}

    def stalled_client() -> None:
        started = time.monotonic()
        with board.handle() as handle:
            try:
                handle.client_connect({"service": "stuck"})
            except SwitchboardError as exc:
                outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    waiter = threading.Thread(target=stalled_client)
    waiter.start()
    time.sleep(0.1)  # the stalled connect is under way
    with board.handle() as handle:
        started = time.monotonic()
        answers = [talk(handle, {"service": "fine"}) for _ in range(5)]
        fine_took = time.monotonic() - started
    waiter.join(10)
    assert answers == [b"fine:hi"] * 5
    assert fine_took < ACCEPT_TIMEOUT / 2, "other clients waited for the stalled server"
    error = outcome["error"]
    assert isinstance(error, SwitchboardError) and error.code == "timeout"
    assert "server {service: stuck} did not accept the connection within 1 s" in error.message
    assert ACCEPT_TIMEOUT * 0.9 <= outcome["took"] < ACCEPT_TIMEOUT + 2


def test_a_server_may_refuse_with_a_reason(board: Board) -> None:
    board.peer("refuse", "shop", "service=shop")
    with board.handle() as handle, pytest.raises(SwitchboardError) as caught:
        handle.client_connect({"service": "shop"})
    assert caught.value.code == "refused"
    assert caught.value.message == "server {service: shop} refused the connection: shop is closed"


def test_a_stalled_replica_stops_getting_connections(board: Board) -> None:
    # Registered first, the stalled replica is first in the round robin. Once
    # it has a connection it has not taken (a backlog on its listener), the
    # broker sends everything to the replica that keeps up: one client times
    # out, not every other one.
    board.peer("stall", "stuck", "service=api")
    board.peer("echo", "fine", "service=api")
    timeouts, answers = 0, []
    started = time.monotonic()
    with board.handle() as handle:
        for _ in range(6):
            try:
                answers.append(talk(handle, {"service": "api"}))
            except SwitchboardError as exc:
                assert exc.code == "timeout", exc
                timeouts += 1
        (group,) = handle.list({"service": "api"})
    assert timeouts == 1 and answers == [b"fine:hi"] * 5
    assert time.monotonic() - started < ACCEPT_TIMEOUT + 2
    assert group["replicas"] == 2 and group["backlog"] > 0 and group["connections"] == 6


def test_a_server_dying_with_connections_queued_sends_them_to_a_replica(board: Board) -> None:
    stuck = board.peer("stall", "stuck", "service=api")  # first in the round robin
    board.peer("echo", "fine", "service=api")
    outcome: dict[str, object] = {}

    def client() -> None:
        started = time.monotonic()
        with board.handle() as handle:
            outcome["answer"] = talk(handle, {"service": "api"})
        outcome["took"] = time.monotonic() - started

    waiter = threading.Thread(target=client)
    waiter.start()
    time.sleep(0.2)  # the connection is queued on the stalled server's listener
    stuck.kill()
    waiter.join(10)
    # The kernel closed the queued connection with the listener; the client
    # read end-of-stream instead of an answer and asked again.
    assert outcome["answer"] == b"fine:hi"
    assert outcome["took"] < ACCEPT_TIMEOUT  # not a timeout: an early retry


def _in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``work`` in a thread; the list gets its result or exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_server_answers_on_the_connection(board: Board) -> None:
    """Skipping clients that gave up, and what a client makes of a bad answer."""
    with board.handle() as root, root.server_start({"service": "raw"}) as listener:
        # A client that gave up before the server answered: the server's
        # accept() skips it and returns the next connection.
        reply, fd = root.call("client_connect", labels={"service": "raw"})
        assert reply["accept_timeout"] == ACCEPT_TIMEOUT
        os.close(fd)
        with board.handle() as client:
            caller, outcome = _in_thread(lambda: talk(client, {}))
            conn = listener.accept()
            with conn.socket as sock:
                assert sock.recv(2) == b"hi"
                sock.sendall(b"ok")
            caller.join(10)
        assert outcome == [b"ok"]
        # A server that starts talking without answering is not a switchboard server.
        with board.handle() as client:
            caller, outcome = _in_thread(lambda: client.client_connect({}))
            incoming = listener.receive()
            with incoming.socket as sock:
                sock.sendall(b"HTTP/1.1 200 OK\r\n")
            caller.join(10)
        (error,) = outcome
        assert isinstance(error, ProtocolError) and error.code == "malformed"
        assert "answered b'H', not ACCEPT or REFUSE" in error.message


def test_a_full_listener_is_a_timeout_for_that_request_only(board: Board) -> None:
    # A server that never reads its listener: the kernel queues events until
    # the listener is full, then the broker waits for room at most the accept
    # timeout, in that request only.
    board.peer("stall", "stuck", "service=stuck")
    board.peer("echo", "fine", "service=fine")
    queued = 0
    with board.handle() as flooder, board.handle() as bystander:
        while True:
            try:
                _, fd = flooder.call("client_connect", labels={"service": "stuck"})
            except SwitchboardError as exc:
                error = exc
                break
            os.close(fd)  # this client gives up at once; its event stays queued
            queued += 1
            assert queued < 100_000, "the listener never filled"
        assert error.code == "timeout"
        assert "did not take the connection within 1 s" in error.message
        assert queued > 50
        assert talk(bystander, {"service": "fine"}) == b"fine:hi"
        (group,) = bystander.list({"service": "stuck"})
        assert group["backlog"] > 0 and group["connections"] == queued


# -- malformed messages and limits -------------------------------------------


def _raw(board: Board) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(board.path)
    return sock


def _closed(sock: socket.socket) -> bool:
    return sock.recv(10) == b""


@pytest.mark.parametrize(
    "packet",
    [b"not json", b'{"v":2,"op":"list","labels":{"a":7}}', b"\x00" * 70000, b""],
    ids=["garbage", "bad-type", "oversized", "empty"],
)
def test_a_malformed_message_closes_only_its_handle(board: Board, packet: bytes) -> None:
    board.peer("echo", "api", "service=api")
    with board.handle() as bystander, _raw(board) as bad:
        bad.send(packet)
        if packet:
            reply = decode_object(bad.recv(65536))
            assert reply["ok"] is False and reply["error"] == "malformed"
        assert _closed(bad)
        assert talk(bystander, {"service": "api"}) == b"api:hi"


def test_a_request_carrying_fds_is_malformed_and_the_fds_are_not_kept(board: Board) -> None:
    r, w = os.pipe()
    with _raw(board) as bad:
        fds = array.array("i", [r, r, r])
        bad.sendmsg([encode({"op": "info"})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.close(r)
        reply = decode_object(bad.recv(65536))
        assert reply["error"] == "malformed" and "no fds" in reply["message"]
        assert _closed(bad)
    # The broker closed every copy of the read end: the write end sees EPIPE.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


def test_unknown_ops_and_versions_are_errors_that_keep_the_handle(board: Board) -> None:
    with _raw(board) as sock:
        sock.send(b'{"v":9,"op":"info","id":1}')
        assert decode_object(sock.recv(65536))["error"] == "version"
        sock.send(b'{"v":2,"op":"teleport","id":2}')
        assert decode_object(sock.recv(65536))["error"] == "unknown_op"
        sock.send(b'{"v":2,"op":"info","id":"x"}')
        reply = decode_object(sock.recv(65536))
        assert reply["ok"] is True and reply["id"] == "x"


def test_a_malformed_listener_message_drops_only_that_server(board: Board) -> None:
    board.peer("echo", "good", "service=good")
    with board.handle() as handle:
        listener = handle.server_start({"service": "bad"})
        listener.socket.send(b"{oops")
        assert decode_object(listener.socket.recv(65536))["error"] == "malformed"
        assert listener.socket.recv(10) == b""
        assert handle.list({"service": "bad"}) == []
        assert talk(handle, {"service": "good"}) == b"good:hi"
        listener.close()


def test_the_broker_leaks_no_fds(board: Board) -> None:
    board.peer("echo", "api", "service=api")
    fd_dir = f"/proc/{board.broker.pid}/fd"
    with board.handle() as handle:
        talk(handle, {"service": "api"})
        time.sleep(0.2)  # the broker closes its copy of an fd just after sending it
        before = len(os.listdir(fd_dir))
        for _ in range(30):
            talk(handle, {"service": "api"})
            handle.constrain(rights=["list"]).close()
            with pytest.raises(SwitchboardError):
                handle.client_connect({"service": "none"})
        time.sleep(0.2)
        assert len(os.listdir(fd_dir)) == before


# -- the command line ----------------------------------------------------------


def _cli(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "supervisor", "switchboard", *argv],
        input=stdin,
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )


def test_cat_ls_and_their_errors(board: Board) -> None:
    listener = subprocess.Popen(
        [PYTHON, "-m", "supervisor", "switchboard", "cat", "-l", board.path, "service=cat,x=1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    board.procs.append(listener)  # type: ignore[arg-type]
    assert b"serving {service: cat, x: 1}" in listener.stderr.readline()  # type: ignore[union-attr]
    listed = _cli("ls", board.path, "x=1")
    assert listed.stdout == b"{service: cat, x: 1}  replicas=1 backlog=0 connections=0\n"
    assert _cli("ls", board.path, "x=2").stdout == b""
    client = subprocess.Popen(
        [PYTHON, "-m", "supervisor", "switchboard", "cat", board.path, "service=cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    board.procs.append(client)  # type: ignore[arg-type]
    client.stdin.write(b"to the server\n")  # type: ignore[union-attr]
    client.stdin.close()  # type: ignore[union-attr]
    out, _ = listener.communicate(b"to the client\n", timeout=30)
    assert listener.returncode == 0
    assert out == b"to the server\n"
    assert client.stdout.read() == b"to the client\n"  # type: ignore[union-attr]
    assert client.wait(30) == 0
    missing = _cli("cat", board.path, "service=cat")
    assert missing.returncode == 125
    assert b"capvisor: no matching server for {service: cat} (no_match)" in missing.stderr
    bad = _cli("ls", board.path, "service")
    assert bad.returncode == 125
    assert b"label 'service' must be NAME=VALUE" in bad.stderr
    gone = _cli("ls", board.path + ".absent")
    assert gone.returncode == 125
    assert b".absent: No such file or directory" in gone.stderr


def test_running_out_of_fds_fails_requests_not_the_broker(work: Path) -> None:
    board = Board(work, nofile=40)
    try:
        with board.handle() as root:
            handles = []
            with pytest.raises(SwitchboardError) as caught:
                for _ in range(100):
                    handles.append(root.constrain(rights=["list"]))
            assert caught.value.code == "resources"
            assert "Too many open files" in caught.value.message
            assert 10 < len(handles) < 40
            for handle in handles:
                handle.close()
            time.sleep(0.2)
            assert root.constrain(rights=["list"]).list() == []
    finally:
        board.close()
    assert board.broker.returncode == 0


def test_ingress_adds_the_addresses_as_labels(board: Board) -> None:
    board.peer("labels", "who", "service=who")
    ingress = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "supervisor",
            "switchboard",
            "ingress",
            "--listen",
            "tcp:127.0.0.1:0",
            board.path,
            "service=who",
            "via=tcp",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    board.procs.append(ingress)
    line = _wait_line(ingress, "stderr", "ingress on")
    port = int(re.search(r"ingress on 127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        host, client_port = tcp.getsockname()
        answer = tcp.makefile("rb").read()
    assert json.loads(answer) == {
        "ingress.local": f"127.0.0.1:{port}",
        "ingress.peer": f"{host}:{client_port}",
        "service": "who",
        "via": "tcp",
    }
