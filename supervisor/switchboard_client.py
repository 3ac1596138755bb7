"""A blocking switchboard client for programs: standard library only, no trio.

A program given ``!server`` or ``!client`` finds its handle by name in
``LISTEN_FDNAMES``::

    from supervisor.switchboard_client import Handle

    with Handle.from_listen_fds("api").server_start() as listener:
        while True:
            conn = listener.accept()          # a connected SOCK_STREAM socket
            conn.socket.sendall(b"hello\\n")
            conn.socket.close()

and a client: ``Handle.from_listen_fds("db").client_connect({"role": "primary"})``,
which returns once the server accepted (or raises ``timeout``/``refused``).
Failures the broker reports raise :class:`SwitchboardError` (``.code`` is one
of docs/switchboard.md's error codes); a broken protocol raises
:class:`ProtocolError`; the socket's own errors are :class:`OSError`.
This module also implements :class:`supervisor.resolve.SwitchboardAccess`,
which is how ``capvisor run --switchboard PATH`` resolves the tags.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .switchboard_protocol import (
    ACCEPT,
    ANCILLARY_SPACE,
    ATTEMPTS,
    MAX_MESSAGE,
    MAX_REASON,
    REFUSE,
    SEQPACKET,
    ProtocolError,
    SwitchboardError,
    accept_timeout_of,
    answer_kind,
    answer_timeout,
    check_reply,
    decode_received,
    encode,
    refusal,
    unavailable,
)

__all__ = ["Connection", "Handle", "Incoming", "Listener", "ProtocolError", "SwitchboardError"]


_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], int | None]:
    """One message and the fd it carried; raises ProtocolError or EOFError."""
    return decode_received(*sock.recvmsg(MAX_MESSAGE, ANCILLARY_SPACE, _CLOEXEC)[:3])


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendmsg([encode(message)])


def _wrap(fd: int, kind: int) -> socket.socket:
    """A socket object for an fd the broker sent (its kind is known: no probing syscalls)."""
    return socket.socket(socket.AF_UNIX, kind, 0, fd)


def _recv_by(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes (b"" at EOF or reset) before ``deadline``; else TimeoutError.

    Reads without blocking and waits with poll(2), so the socket's own
    blocking mode is never changed (a ``!connect`` socket is handed to a
    program as it is); bytes already there cost no poll.
    """
    poller = None
    while True:
        try:
            return sock.recv(size, _DONTWAIT)
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return b""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if poller is None:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
        poller.poll(math.ceil(left * 1000))


def await_answer(sock: socket.socket, labels: Mapping[str, str], timeout: float) -> bool:
    """Wait for the server's answer on a new connection: True when it accepted.

    False when the server went away without answering (try again); raises
    :class:`SwitchboardError` ``refused`` (with its reason) or ``timeout``,
    and :class:`ProtocolError` for an answer that is not ACCEPT or REFUSE.
    """
    deadline = time.monotonic() + timeout
    try:
        kind = answer_kind(_recv_by(sock, 1, deadline))
    except TimeoutError:
        raise answer_timeout(labels, timeout) from None
    if kind != "refuse":
        return kind == "accept"
    reason = b""
    with contextlib.suppress(TimeoutError):  # a reason that never ends: what came in time
        while len(reason) <= MAX_REASON and (chunk := _recv_by(sock, MAX_REASON, deadline)):
            reason += chunk
    raise refusal(labels, reason)


@dataclass
class Connection:
    """A connected stream socket and the connection's labels (server's and client's)."""

    socket: socket.socket
    labels: dict[str, str]

    def close(self) -> None:
        self.socket.close()


class Handle:
    """A switchboard handle (owns its socket); use as a context manager."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, *, timeout: float | None = 60.0) -> None:
        self.socket = sock
        self.socket.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = 60.0) -> Handle:
        """A root handle: connect to a broker's socket at ``path``."""
        sock = socket.socket(socket.AF_UNIX, SEQPACKET)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    @classmethod
    def from_fd(cls, fd: int, *, timeout: float | None = 60.0) -> Handle:
        """Take ownership of the handle at ``fd``."""
        return cls(socket.socket(fileno=fd), timeout=timeout)

    @classmethod
    def from_listen_fds(cls, name: str, *, timeout: float | None = 60.0) -> Handle:
        """The fd named ``name`` in ``LISTEN_FDNAMES`` (fds count from 3)."""
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        if name not in names:
            raise LookupError(f"no fd named {name!r} in LISTEN_FDNAMES ({':'.join(names)})")
        return cls.from_fd(3 + names.index(name), timeout=timeout)

    def call(self, op: str, **fields: Any) -> tuple[Mapping[str, Any], int | None]:
        """Send one request and wait for its reply: (reply, fd or None).

        Raises :class:`SwitchboardError` when the reply reports a failure.
        """
        ident = next(self._ids)
        _send(self.socket, {"op": op, "id": ident, **fields})
        reply, fd = _receive(self.socket)
        try:
            if reply.get("id") != ident:
                raise ProtocolError("malformed", f"reply to {reply.get('id')!r}, not {ident}")
            check_reply(reply)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return reply, fd

    def _with_fd(self, op: str, **fields: Any) -> tuple[Mapping[str, Any], int]:
        reply, fd = self.call(op, **fields)
        if fd is None:
            raise ProtocolError("malformed", f"the {op} reply carried no fd")
        return reply, fd

    def info(self) -> dict[str, Any]:
        """This handle's rights, in_labels and out_labels."""
        reply, _ = self.call("info")
        return {k: reply[k] for k in ("rights", "in_labels", "out_labels")}

    def constrain(
        self,
        rights: Iterable[str] | None = None,
        in_labels: Mapping[str, str] | None = None,
        out_labels: Mapping[str, str] | None = None,
    ) -> Handle:
        """A new handle with fewer rights (``None``: the same) and more labels."""
        fields: dict[str, Any] = {}
        if rights is not None:
            fields["rights"] = list(rights)
        if in_labels:
            fields["in_labels"] = dict(in_labels)
        if out_labels:
            fields["out_labels"] = dict(out_labels)
        _, fd = self._with_fd("constrain", **fields)
        return Handle.from_fd(fd, timeout=self.socket.gettimeout())

    def server_start(self, labels: Mapping[str, str] | None = None) -> Listener:
        """Register a server; connections arrive on the returned listener."""
        reply, fd = self._with_fd("server_start", labels=dict(labels or {}))
        return Listener(_wrap(fd, socket.SOCK_SEQPACKET), dict(reply.get("labels", {})))

    def client_connect(self, labels: Mapping[str, str] | None = None) -> Connection:
        """Connect to the one server (group) matching ``labels``.

        Returns once the server accepted; a server that went away before
        answering is replaced by another replica (up to ``ATTEMPTS`` tries).
        """
        wanted = dict(labels or {})
        for _ in range(ATTEMPTS):
            reply, fd = self._with_fd("client_connect", labels=wanted)
            sock = _wrap(fd, socket.SOCK_STREAM)
            connection = dict(reply.get("labels", {}))
            try:
                if await_answer(sock, connection, accept_timeout_of(reply)):
                    return Connection(sock, connection)
            except BaseException:
                sock.close()
                raise
            sock.close()
        raise unavailable(wanted)

    def list(self, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The server groups matching ``labels`` (needs the ``list`` right)."""
        reply, _ = self.call("list", labels=dict(labels or {}))
        return list(reply["servers"])

    # SwitchboardAccess (supervisor.resolve), for the supervisor itself.

    def server_handle(self, labels: Mapping[str, str]) -> int:
        """An fd of a new handle that may only start servers, with ``labels`` fixed."""
        _, fd = self._with_fd("constrain", rights=["server_start"], in_labels=dict(labels))
        return fd

    def client_handle(self, labels: Mapping[str, str]) -> int:
        """An fd of a new handle that may only connect, with ``labels`` fixed."""
        _, fd = self._with_fd("constrain", rights=["client_connect"], out_labels=dict(labels))
        return fd

    def connect_fd(self, labels: Mapping[str, str]) -> int:
        """An fd of a stream connected to (and accepted by) the server matching ``labels``."""
        return self.client_connect(labels).socket.detach()

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Incoming:
    """A connection the broker delivered, not yet accepted or refused."""

    socket: socket.socket
    labels: dict[str, str]


class Listener:
    """A started server: receives connections, accepts or refuses them."""

    def __init__(self, sock: socket.socket, labels: dict[str, str]) -> None:
        self.socket = sock
        self.labels = labels

    def receive(self) -> Incoming:
        """Wait for the next delivered connection; answer it with :meth:`answer`.

        Raises EOFError when the broker closed the listener.
        """
        while True:
            message, fd = _receive(self.socket)
            if message.get("event") == "connection" and fd is not None:
                return Incoming(_wrap(fd, socket.SOCK_STREAM), dict(message.get("labels", {})))
            if fd is not None:
                os.close(fd)
            if message.get("ok") is False:
                check_reply(message)

    def accept(self) -> Connection:
        """The next connection, accepted (connections whose client gave up are skipped)."""
        while True:
            incoming = self.receive()
            if self.answer(incoming):
                return Connection(incoming.socket, incoming.labels)

    def answer(self, incoming: Incoming, refuse: str | None = None) -> bool:
        """Accept ``incoming`` or, with a reason, refuse it (its socket is then closed).

        False when the client had already given up (its socket is closed too).
        """
        try:
            if refuse is None:
                incoming.socket.sendall(ACCEPT)
                return True
            incoming.socket.sendall(REFUSE + refuse.encode()[:MAX_REASON])
        except (BrokenPipeError, ConnectionResetError):
            incoming.socket.close()
            return False
        incoming.socket.close()
        return True

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        """Stop serving: the broker prunes this server."""
        self.socket.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
