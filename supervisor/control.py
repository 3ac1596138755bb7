"""The control socket of ``capvisor up``: one JSON request, one JSON answer.

A unix stream socket, mode 0600 in a 0700 state directory: only the user
who runs the supervisor can control it. A client connects, sends one line
of JSON ``{"op": OP, ...}`` and reads one line back: ``{"ok": true, ...}``
or ``{"ok": false, "error": MESSAGE}``. Ops (docs/service.md): ``ps``,
``status NAME``, ``start|stop|restart NAME``, ``reload``, ``down``,
``logs NAME`` (answers the log path; the client reads the file).

The server side is :func:`serve`, with a handler the caller provides;
:func:`request` is the blocking client the CLI uses.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .errors import CapvisorError
from .unixsock import bind_private, short_path

#: The longest request line accepted.
MAX_REQUEST = 64 << 10

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(CapvisorError):
    """The supervisor is unreachable or refused the request."""


def bind(path: Path) -> trio.socket.SocketType:
    """A listening socket at ``path`` (mode 0600); a stale file there is replaced.

    Raises :class:`ControlError` if another supervisor answers there.
    """
    if path.exists():
        try:
            request(path, {"op": "ping"}, timeout=1.0)
        except ControlError:
            path.unlink(missing_ok=True)  # stale: nobody listens
        else:
            raise ControlError(f"{path}: another capvisor up is already running there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        bind_private(sock, path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlError(f"control socket {path}: {exc.strerror}") from exc
    return trio.socket.from_stdlib_socket(sock)


async def serve(
    listener: trio.socket.SocketType,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``listener`` with ``handler`` until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_answer, conn, handler)


async def _answer(conn: trio.socket.SocketType, handler: Handler) -> None:
    stream = trio.SocketStream(conn)
    async with stream:
        data = b""
        with trio.move_on_after(10):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        try:
            req = json.loads(data.split(b"\n", 1)[0] or b"null")
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("a request is a JSON object with an 'op'")
        except ValueError as exc:
            answer: dict[str, Any] = {"ok": False, "error": f"bad request: {exc}"}
        else:
            try:
                answer = await handler(req)
            except CapvisorError as exc:
                answer = {"ok": False, "error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(answer).encode() + b"\n")


def request(path: Path, req: dict[str, Any], *, timeout: float | None = 120.0) -> dict[str, Any]:
    """Send ``req`` to the supervisor at ``path`` and return its answer.

    Raises :class:`ControlError` if it cannot be reached or answers an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        with short_path(path) as where:
            sock.connect(where)
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError as exc:
        raise ControlError(f"no supervisor at {path} (is `capvisor up` running?)") from exc
    except ConnectionRefusedError as exc:
        raise ControlError(f"no supervisor listens at {path} (a stale socket)") from exc
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(
            f"control socket {path}: the supervisor closed without answering"
        ) from exc
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request failed")))
    return dict(answer)
