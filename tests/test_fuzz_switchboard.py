"""Fuzzing the switchboard broker's handles and listeners with random messages and fds,
and the client library with random answers from a server.

A real broker (`capvisor switchboard serve`) and a real echo server
(tests/switchboard_peer.py) run for the whole module. Each example opens a
fresh handle (or a listener started on one), sends it random packets: random
bytes or JSON-shaped requests, with random fds in ``SCM_RIGHTS`` (sometimes
far more than the broker's control buffer holds). The property, per packet:
the broker answers with a well-formed reply, or closes that handle, and
after a ``malformed`` reply the handle is closed. After every example a
well-behaved client on another handle still reaches the echo server, and
once the fuzzed handle is closed the broker holds exactly the fds it held
before and has no child.

A server's answer on a new connection is fuzzed from the client's side: the
test's own server writes random bytes as its answer, and ``client_connect``
must return the connection exactly when they start with ACK (the rest is
then data), report ``refused`` for NAK, ``unavailable`` when every try ends
without an answer, and ``malformed`` for anything else: no hang, no leaked fd.

Budget: ``CAPVISOR_FUZZ_EXAMPLES`` (see docs/security.md), 60 examples in CI.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.switchboard_client import Handle
from supervisor.switchboard_protocol import (
    ACCEPT,
    ATTEMPTS,
    MAX_MESSAGE,
    REFUSE,
    ProtocolError,
    SwitchboardError,
    decode_received,
)

from .security.harness import Snapshot, children, fuzz_budget, time_limit
from .test_switchboard import Board, talk

GOOD = {"service": "echo", "realm": "good"}
#: The fuzzed handles carry this label, so servers they start never match GOOD.
FUZZ_REALM = {"realm": "fuzz"}
RIGHTS = ["server_start", "client_connect", "list", "constrain"]
SCM_MAX_FD = 253  # the kernel's limit per message; more is EINVAL on sendmsg


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    b = Board(tmp_path_factory.mktemp("fuzzboard"))
    try:
        b.peer("echo", "echo", *(f"{k}={v}" for k, v in GOOD.items()))
        yield b
    finally:
        b.close()


# -- what a packet is ---------------------------------------------------------

_label_names = st.one_of(
    st.sampled_from(["service", "realm", "program", "tier", "a.b/c-d"]),
    st.text(max_size=300),
)
_labels = st.one_of(
    st.dictionaries(_label_names, st.text(max_size=40), max_size=5),
    st.dictionaries(_label_names, st.text(min_size=1000, max_size=1100), max_size=2),
    st.integers(),
    st.lists(st.text(max_size=5), max_size=3),
    st.none(),
)
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), _json_scalar),
        "op": st.one_of(
            st.sampled_from([*RIGHTS, "info", "accept", "refuse", "bogus"]), _json_scalar
        ),
        "id": st.one_of(st.integers(), st.text(max_size=300), _json_scalar),
        "labels": _labels,
        "in_labels": _labels,
        "out_labels": _labels,
        "rights": st.one_of(st.lists(st.sampled_from([*RIGHTS, "root", ""]), max_size=5), _labels),
        "message": st.text(max_size=30),
        "extra": _json_scalar,
    },
)


def _payload(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "json", "huge", "junk-json"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "huge":
        return b"{" + b" " * (MAX_MESSAGE + draw(st.integers(0, 100))) + b"}"
    text = json.dumps(draw(_requests))
    if kind == "junk-json":  # duplicate keys, constants, cut short
        text = draw(
            st.sampled_from(
                [text[: len(text) // 2], text[:-1] + ', "v": 2}', '{"v": NaN}', "[1]", text * 2]
            )
        )
    return text.encode(errors="surrogatepass")


@dataclass(frozen=True)
class Packet:
    data: bytes
    fds: int  # how many fds ride along


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    fds = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 3), st.sampled_from([9, 64])))
    return Packet(_payload(draw), fds)


@dataclass(frozen=True)
class Case:
    target: str  # "handle" or "listener"
    rights: tuple[str, ...]
    packets: tuple[Packet, ...]


cases = st.builds(
    Case,
    st.sampled_from(["handle", "handle", "listener"]),
    st.lists(st.sampled_from(RIGHTS), unique=True).map(tuple),
    st.lists(packets(), min_size=1, max_size=6).map(tuple),
)


# -- the exchange ---------------------------------------------------------------


def _send(sock: socket.socket, packet: Packet) -> bool:
    """Send ``packet`` with throwaway fds; False when the broker has closed the socket."""
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(packet.fds)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([packet.data], anc if fds else [])
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False
    except OSError as e:  # over wmem for the huge ones: not the broker's doing
        assert e.errno in (90, 105), e  # EMSGSIZE, ENOBUFS
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _receive(sock: socket.socket) -> dict[str, object] | None:
    """The broker's reply (its fd closed at once), or None at end of file."""
    try:
        data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, 1024, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return None
    try:
        reply, fd = decode_received(data, anc, flags)
    except EOFError:
        return None
    except ProtocolError as e:
        raise AssertionError(f"the broker sent a malformed reply: {data!r}") from e
    if fd is not None:
        os.close(fd)  # a handle, listener or connection some valid request earned
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) and isinstance(reply.get("message"), str)
    return reply


def _exchange(sock: socket.socket, packets: tuple[Packet, ...], replies: bool) -> None:
    for packet in packets:
        if not _send(sock, packet):
            return
        if not replies:  # a listener answers nothing; a bad message closes it
            continue
        if not packet.data and not packet.fds:
            assert _receive(sock) is None  # an empty packet reads as end of file
            return
        reply = _receive(sock)
        if reply is None:
            return
        if reply.get("error") == "malformed":
            assert _receive(sock) is None, "the handle stayed open after a malformed message"
            return


def _settle(board: Board, before: Snapshot, seconds: float = 5.0) -> list[str]:
    """The broker's leaks, once it has had up to ``seconds`` to notice closed handles."""
    deadline = time.monotonic() + seconds
    while True:
        leaks = before.leaks(Snapshot.take(board.broker.pid))
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(0.02)


def _serve_answers(
    handle: Handle, labels: dict[str, str], answer: bytes, times: int, ready: threading.Event
) -> None:
    """Answer ``times`` connections with the bytes ``answer``, then stop serving."""
    with handle.server_start(labels) as listener:
        ready.set()
        for _ in range(times):
            incoming = listener.receive()
            with incoming.socket as sock, contextlib.suppress(OSError):
                sock.sendall(answer)  # the client may have given up already


def test_random_answers_from_a_server(tmp_path: Path) -> None:
    board = Board(tmp_path)
    try:
        with board.handle() as server_root, board.handle() as client:
            serial = iter(range(1_000_000))

            @settings(max_examples=fuzz_budget(100), deadline=None)
            @given(
                answer=st.one_of(
                    st.binary(max_size=1200),
                    st.binary(max_size=4).map(lambda b: ACCEPT + b),
                    st.text(max_size=40).map(lambda t: REFUSE + t.encode()),
                )
            )
            def check(answer: bytes) -> None:
                labels = {"realm": "answers", "n": str(next(serial))}
                times = ATTEMPTS if not answer else 1
                fds_before = len(os.listdir("/proc/self/fd"))
                ready = threading.Event()
                server = threading.Thread(
                    target=_serve_answers, args=(server_root, labels, answer, times, ready)
                )
                server.start()
                assert ready.wait(10)
                outcome: object
                with time_limit(30):
                    try:
                        conn = client.client_connect(labels)
                    except (SwitchboardError, ProtocolError) as exc:
                        outcome = exc
                    else:
                        with conn.socket as sock:
                            rest = b""
                            while chunk := sock.recv(65536):
                                rest += chunk
                        outcome = rest
                    server.join(10)
                first = answer[:1]
                if first == ACCEPT:
                    assert outcome == answer[1:]
                elif first == REFUSE:
                    assert isinstance(outcome, SwitchboardError) and outcome.code == "refused"
                elif not first:
                    assert isinstance(outcome, SwitchboardError)
                    assert outcome.code == "unavailable"
                else:
                    assert isinstance(outcome, ProtocolError) and outcome.code == "malformed"
                assert len(os.listdir("/proc/self/fd")) == fds_before

            check()
    finally:
        board.close()


def test_random_messages_and_fds_on_a_handle(board: Board) -> None:
    good = board.handle()
    root = board.handle()
    with good, root:
        assert talk(good, GOOD) == b"echo:hi"
        before = Snapshot.take(board.broker.pid)

        @settings(
            max_examples=fuzz_budget(60),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(case=cases)
        def check(case: Case) -> None:
            with time_limit(30):
                fuzzed = root.constrain(case.rights, FUZZ_REALM, FUZZ_REALM)
                with fuzzed, contextlib.ExitStack() as stack:
                    fuzzed.socket.settimeout(10)
                    sock = fuzzed.socket
                    if case.target == "listener" and "server_start" in case.rights:
                        listener = stack.enter_context(fuzzed.server_start({"fuzz": "listener"}))
                        sock = listener.socket
                    _exchange(sock, case.packets, replies=sock is fuzzed.socket)
                    assert board.broker.poll() is None, "the broker died"
                    assert talk(good, GOOD, b"still there") == b"echo:still there"
            assert not _settle(board, before), _settle(board, before, 0)
            assert not children(board.broker.pid)

        check()
    assert "Traceback" not in _broker_stderr(board)


def _broker_stderr(board: Board) -> str:
    """What the broker printed since it started (it must be stopped first)."""
    board.close()
    assert board.broker.stderr is not None
    return board.broker.stderr.read()
