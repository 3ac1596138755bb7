"""Bridges between TCP and the switchboard, on trio.

- :func:`ingress`: accepted TCP connections become client connections to
  the matching server, with the peer's and the listening address added as
  labels ``ingress.peer`` and ``ingress.local`` (``HOST:PORT``).
- :func:`egress`: a server that forwards each connection to a fixed TCP
  address; a connection it cannot make is refused with the reason, so the
  client's ``client_connect`` (or a ``!connect`` tag) fails with it.

Each bridge copies bytes both ways with half-close; it is in the data path
(TCP cannot be spliced into a unix socket), the broker is not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import trio

from .switchboard_protocol import (
    ANCILLARY_SPACE,
    MAX_MESSAGE,
    ProtocolError,
    SwitchboardError,
    check_reply,
    decode_received,
    encode,
)
from .tags import Address

#: How long egress tries to reach its address before refusing a connection.
EGRESS_CONNECT_TIMEOUT = 3.0


async def _receive(sock: trio.socket.SocketType) -> tuple[dict[str, Any], int | None]:
    received = await sock.recvmsg(MAX_MESSAGE, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
    return decode_received(*received[:3])


async def _open(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


async def _call(sock: trio.socket.SocketType, op: str, **fields: Any) -> tuple[Any, int]:
    """One request that returns an fd; raises SwitchboardError on failure."""
    await sock.sendmsg([encode({"op": op, "id": 1, **fields})])
    reply, fd = await _receive(sock)
    try:
        check_reply(reply)
        if fd is None:
            raise ProtocolError("malformed", f"the {op} reply carried no fd")
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return reply, fd


async def splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy bytes both ways until both directions reached EOF; then close both."""

    async def copy(src: trio.SocketStream, dst: trio.SocketStream, done: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            done.cancel_scope.cancel()  # one side broke: stop both directions

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b, nursery)
            nursery.start_soon(copy, b, a, nursery)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)


async def _tcp_connect(to: Address) -> trio.SocketStream:
    """A TCP stream to ``to`` (an IP address or localhost); OSError names the reason."""
    host = "127.0.0.1" if to.host == "localhost" else to.host
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        await sock.connect((host, to.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _stream(fd: int) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


def _hostport(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _say(message: str) -> None:
    print(f"capvisor switchboard: {message}", file=sys.stderr, flush=True)


async def ingress(
    path: str,
    listen: Address,
    labels: Mapping[str, str],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve TCP on ``listen``; each connection goes to the server matching ``labels``.

    ``task_status.started`` reports the bound port (useful with port 0).
    Connections that find no server are closed and reported on stderr.
    """
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host or None)
    port = listeners[0].socket.getsockname()[1]

    async def one(tcp: trio.SocketStream) -> None:
        peer = _hostport(tcp.socket.getpeername())
        local = _hostport(tcp.socket.getsockname())
        extra = {**labels, "ingress.peer": peer, "ingress.local": local}
        try:
            with await _open(path) as handle:
                _, fd = await _call(handle, "client_connect", labels=extra)
        except (OSError, EOFError, SwitchboardError, ProtocolError) as exc:
            _say(f"ingress from {peer}: {exc}")
            await trio.aclose_forcefully(tcp)
            return
        await splice(tcp, _stream(fd))

    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(one, listeners, handler_nursery=nursery)


async def egress(
    path: str,
    labels: Mapping[str, str],
    to: Address,
    *,
    task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``labels`` on the switchboard, forwarding each connection to ``to``.

    ``task_status.started`` reports the server's labels. Returns when the
    broker closes the listener (it went away).
    """
    with await _open(path) as handle:
        reply, fd = await _call(handle, "server_start", labels=dict(labels))
    listener = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    lock = trio.Lock()

    async def answer(ident: Any, refuse: str | None = None) -> None:
        message: dict[str, Any] = {"op": "accept", "id": ident}
        if refuse is not None:
            message = {"op": "refuse", "id": ident, "message": refuse}
        async with lock:
            with contextlib.suppress(OSError):
                await listener.sendmsg([encode(message)])

    async def one(ident: Any, conn: trio.SocketStream) -> None:
        try:
            with trio.fail_after(EGRESS_CONNECT_TIMEOUT):
                tcp = await _tcp_connect(to)
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                reason = "timed out"
            else:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
            await answer(ident, f"egress to {to}: {reason}")
            await trio.aclose_forcefully(conn)
            return
        await answer(ident)
        await splice(conn, tcp)

    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started(dict(reply.get("labels", {})))
            while True:
                try:
                    message, fd = await _receive(listener)
                except EOFError:
                    nursery.cancel_scope.cancel()
                    return
                if fd is None or message.get("event") != "connection":
                    if fd is not None:
                        os.close(fd)
                    continue
                nursery.start_soon(one, message.get("id"), _stream(fd))
