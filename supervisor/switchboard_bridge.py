"""Bridges between TCP and the switchboard, on trio.

- :func:`ingress`: accepted TCP connections become client connections to
  the matching server, with the peer's and the listening address added as
  labels ``ingress.peer`` and ``ingress.local`` (``HOST:PORT``).
- :func:`egress`: a server that forwards each connection to a fixed TCP
  address; a connection it cannot make is refused with the reason, so the
  client's ``client_connect`` (or a ``!connect`` tag) fails with it.

Both speak the protocol's connection answer (docs/switchboard.md): ingress
waits for the server's ACCEPT before copying, egress sends it (or REFUSE).

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
    ACCEPT,
    ANCILLARY_SPACE,
    ATTEMPTS,
    MAX_MESSAGE,
    MAX_REASON,
    REFUSE,
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


async def _await_answer(
    stream: trio.SocketStream, labels: Mapping[str, str], timeout: float
) -> bool:
    """The trio twin of :func:`supervisor.switchboard_client.await_answer`."""
    deadline = trio.current_time() + timeout
    first = b""
    with trio.move_on_at(deadline) as waited:
        with contextlib.suppress(trio.BrokenResourceError):
            first = await stream.receive_some(1)
    if waited.cancelled_caught:
        raise answer_timeout(labels, timeout)
    kind = answer_kind(first)
    if kind != "refuse":
        return kind == "accept"
    reason = b""
    with trio.move_on_at(deadline), contextlib.suppress(trio.BrokenResourceError):
        while len(reason) <= MAX_REASON and (chunk := await stream.receive_some(MAX_REASON)):
            reason += chunk
    raise refusal(labels, reason)


async def _client_connect(path: str, labels: Mapping[str, str]) -> trio.SocketStream:
    """A connection the matching server accepted, as the blocking client makes it."""
    with await _open(path) as handle:
        for _ in range(ATTEMPTS):
            reply, fd = await _call(handle, "client_connect", labels=dict(labels))
            stream = _stream(fd)
            try:
                if await _await_answer(stream, reply.get("labels", {}), accept_timeout_of(reply)):
                    return stream
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            await trio.aclose_forcefully(stream)
    raise unavailable(labels)


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
            connection = await _client_connect(path, extra)
        except (OSError, EOFError, SwitchboardError, ProtocolError) as exc:
            _say(f"ingress from {peer}: {exc}")
            await trio.aclose_forcefully(tcp)
            return
        await splice(tcp, connection)

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

    async def one(conn: trio.SocketStream) -> None:
        try:
            with trio.fail_after(EGRESS_CONNECT_TIMEOUT):
                tcp = await _tcp_connect(to)
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                reason = "timed out"
            else:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.send_all(REFUSE + f"egress to {to}: {reason}".encode()[:MAX_REASON])
            await trio.aclose_forcefully(conn)
            return
        try:
            await conn.send_all(ACCEPT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # the client gave up
            await trio.aclose_forcefully(conn)
            await trio.aclose_forcefully(tcp)
            return
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
                nursery.start_soon(one, _stream(fd))
