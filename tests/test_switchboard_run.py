"""!server, !client and !connect in confined programs, and the TCP bridges.

Everything runs as real processes, as root and as an unprivileged user: the
broker (`capvisor switchboard serve`), confined programs (`capvisor run
--switchboard`) speaking the protocol from C (examples/switchboard/sbecho.c),
and the ingress/egress bridges with real TCP peers.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import PYTHON, Capvisor
from .test_switchboard import ROOT, Board

EXAMPLES = Path(__file__).parent.parent / "examples" / "switchboard"
SBECHO = EXAMPLES / "sbecho.c"


@pytest.fixture
def sbecho(cc: Callable[..., Path]) -> Path:
    return cc("sbecho", SBECHO.read_text())


@pytest.fixture
def user_board(capvisor: Capvisor) -> Iterator[Board]:
    capvisor.user.own(capvisor.work)
    board = Board(capvisor.work, capvisor.user)
    yield board
    board.close()


def _lines_until(proc: subprocess.Popen[bytes], word: bytes) -> bytes:
    seen = b""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line
        if word in line:
            return seen
    raise AssertionError(f"{word!r} never came; output: {seen!r}")


def _bg(capvisor: Capvisor, argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*capvisor.user.prefix(), PYTHON, "-m", "supervisor", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


@pytest.fixture
def echo_server(
    capvisor: Capvisor, user_board: Board, sbecho: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The demo's C echo server (examples/switchboard), confined, holding only its !server."""
    text = (EXAMPLES / "echo-server.yaml").read_text().replace("/usr/local/bin/sbecho", str(sbecho))
    description = capvisor.describe(text, "server.yaml")
    proc = capvisor.popen(description, "--switchboard", user_board.path, stdout=subprocess.PIPE)
    head = _lines_until(proc, b"sbecho: serving")
    proc.head = head  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    proc.wait(10)


def test_a_confined_server_is_reached_through_connect(
    capvisor: Capvisor, user_board: Board, echo_server: subprocess.Popen[bytes]
) -> None:
    # The server really has no network of its own.
    assert b"sbecho: no network of my own: socket(AF_INET): Operation not permitted" in (
        echo_server.head  # type: ignore[attr-defined]
    )
    client = capvisor.describe((EXAMPLES / "echo-client.yaml").read_text(), "client.yaml")
    result = capvisor.run(client, "--switchboard", user_board.path)
    assert result.returncode == 0, result.stderr
    assert b"stdout F the server said: hello through the switchboard" in result.log
    # The server's identity label (its name) was added and cannot be dropped.
    with user_board.handle() as handle:
        assert handle.list() == [
            {
                "labels": {"program": "echo", "service": "echo"},
                "replicas": 1,
                "backlog": 0,
                "connections": 1,
            }
        ]


def test_a_client_handle_connects_and_can_do_nothing_else(
    capvisor: Capvisor, user_board: Board, echo_server: subprocess.Popen[bytes], sbecho: Path
) -> None:
    (capvisor.work / "words.txt").write_text("through a client handle\n")
    client = capvisor.describe(
        f"""\
        program: {sbecho}
        args: [connect, !client {{service: echo}}]
        stdin: !file words.txt
        """,
        "client.yaml",
    )
    result = capvisor.run(client, "--switchboard", user_board.path)
    assert result.returncode == 0, result.stderr
    assert b"stdout F through a client handle" in result.log
    # The same kind of handle, asked to start a server: refused by the broker.
    rogue = capvisor.describe(
        f"""\
        program: {sbecho}
        args: [serve, !client {{service: echo}}, service=echo]
        """,
        "rogue.yaml",
    )
    result = capvisor.run(rogue, "--switchboard", user_board.path)
    assert result.returncode == 1
    assert (
        b"sbecho: server_start: this handle may not server_start (its rights: client_connect)"
        b" (permission)" in result.log
    )


def test_switchboard_tags_fail_with_their_location(capvisor: Capvisor, user_board: Board) -> None:
    spoof = capvisor.describe(
        """\
        name: echo
        program: /bin/true
        fds:
          api: !server {service: api, program: other}
        """
    )
    result = capvisor.run(spoof, "--switchboard", user_board.path)
    assert result.returncode == 125
    assert (
        "prog.yaml:4:8: !server: program: identity labels {program: echo} cannot be overridden"
        in result.stderr
    )
    missing = capvisor.describe(
        """\
        program: /bin/true
        args: [--to, !connect {service: nowhere}]
        """
    )
    result = capvisor.run(missing, "--switchboard", user_board.path)
    assert result.returncode == 125
    assert "prog.yaml:2:14: !connect: no matching server for {service: nowhere}" in result.stderr
    result = capvisor.run(missing, "--switchboard", str(capvisor.work / "absent.sock"))
    assert result.returncode == 125
    assert "absent.sock: No such file or directory" in result.stderr


def test_ingress_brings_a_tcp_client_to_a_confined_server(
    capvisor: Capvisor, user_board: Board, echo_server: subprocess.Popen[bytes]
) -> None:
    ingress = _bg(
        capvisor,
        ["switchboard", "ingress", "--listen", "tcp:127.0.0.1:0", user_board.path, "service=echo"],
    )
    try:
        line = _lines_until(ingress, b"ingress on")
        port = int(re.search(rb"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        for n in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
                tcp.sendall(b"over tcp %d\n" % n)
                tcp.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := tcp.recv(65536):
                    answer += chunk
            assert answer == b"over tcp %d\n" % n
    finally:
        ingress.terminate()
        ingress.wait(10)


class _TcpEcho:
    """A plain TCP server outside any sandbox: answers ``outside:`` + what it read."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                conn.sendall(b"outside:" + line)


def test_egress_lets_connect_reach_an_allowed_outside_service(
    capvisor: Capvisor, user_board: Board
) -> None:
    outside = _TcpEcho()
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    bridges = [
        _bg(
            capvisor,
            [
                "switchboard",
                "egress",
                "--to",
                f"tcp:127.0.0.1:{outside.port}",
                user_board.path,
                "service=outside",
            ],
        ),
        _bg(
            capvisor,
            [
                "switchboard",
                "egress",
                "--to",
                f"tcp:127.0.0.1:{closed_port}",
                user_board.path,
                "service=down",
            ],
        ),
    ]
    try:
        for bridge in bridges:
            _lines_until(bridge, b"egress {service:")
        client = capvisor.describe(
            """\
            program: /bin/sh
            args: [-c, 'echo hello >&3; read line <&3; echo "got: $line"']
            fds:
              out: !connect {service: outside}
            """
        )
        result = capvisor.run(client, "--switchboard", user_board.path)
        assert result.returncode == 0, result.stderr
        assert b"stdout F got: outside:hello" in result.log
        down = capvisor.describe(
            """\
            program: /bin/true
            fds:
              out: !connect {service: down}
            """,
            "down.yaml",
        )
        result = capvisor.run(down, "--switchboard", user_board.path)
        assert result.returncode == 125
        assert (
            f"down.yaml:3:8: !connect: server {{service: down}} refused the connection: "
            f"egress to tcp:127.0.0.1:{closed_port}: Connection refused" in result.stderr
        )
    finally:
        outside.sock.close()
        for bridge in bridges:
            bridge.terminate()
            bridge.wait(10)


def test_a_confined_python_program_uses_the_client_module(
    capvisor: Capvisor, user_board: Board, echo_server: subprocess.Popen[bytes]
) -> None:
    script = (
        "from supervisor.switchboard_client import Handle, SwitchboardError\n"
        "handle = Handle.from_listen_fds('echo')\n"
        "conn = handle.client_connect({'client': 'py'})\n"
        "conn.socket.sendall(b'from python')\n"
        "print(conn.socket.recv(100).decode(), sorted(conn.labels.items()))\n"
        "try:\n"
        "    handle.server_start({'service': 'echo'})\n"
        "except SwitchboardError as exc:\n"
        "    print('refused:', exc.code)\n"
    )
    description = capvisor.describe(
        f"""\
        program: {PYTHON}
        args: [-c, {script!r}]
        env: {{PYTHONPATH: {ROOT}}}
        fds:
          echo: !client {{service: echo}}
        runtime: [{ROOT}/supervisor]
        """
    )
    result = capvisor.run(description, "--switchboard", user_board.path)
    assert result.returncode == 0, (result.stderr, result.log)
    assert b"from python [('client', 'py'), ('program', 'echo'), ('service', 'echo')]" in result.log
    assert b"refused: permission" in result.log
