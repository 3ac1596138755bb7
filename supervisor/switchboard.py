"""The switchboard broker (DESIGN §7): label-matched connections handed out as fds.

One trio task per handle and one per started server; no threads. A *handle*
is an AF_UNIX SOCK_SEQPACKET socket whose requests (docs/switchboard.md) the
broker answers one at a time, with its rights and in/out labels checked on
every request. ``server_start`` returns a *listener* socket on which the
broker delivers connections: one end of a fresh socketpair, in SCM_RIGHTS.
``client_connect`` returns the other end at once, with the accept timeout;
the server answers on the connection itself (ACCEPT, or REFUSE and a
reason), and the client waits for that answer at most the accept timeout.
The broker is then out of the data path, and it never waits for a server
to answer, so a stalled server cannot delay anyone but its own clients.

Bounded waits: a server whose listener is full (it stopped taking
connections) makes ``client_connect`` fail with ``timeout`` after
``accept_timeout``; other handles are never blocked by it. A malformed
message gets a ``malformed`` reply and its handle (or listener) is closed;
nothing else is affected. A listener that reaches EOF (the server exited or
closed it) is pruned at once.

Embedding: run :meth:`Broker.run` (no socket) or :meth:`Broker.serve` (a root
socket at a path, created 0600) in a nursery; :meth:`Broker.open_handle`
then makes handles from the trio thread.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import os
import socket
import stat
import struct
import termios
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import trio

from .errors import CapvisorError
from .switchboard_protocol import (
    ANCILLARY_SPACE,
    ATTEMPTS,
    MAX_MESSAGE,
    RIGHTS,
    SEQPACKET,
    STREAM,
    TRUNCATED,
    Labels,
    Message,
    ProtocolError,
    SwitchboardError,
    decode_request,
    encode,
    error_reply,
    fds_of,
    format_labels,
    merge,
    ok_reply,
    unavailable,
)
from .switchboard_registry import Registry, Target
from .unixsock import bind_private

#: Default bound on a server taking and answering a connection, seconds.
ACCEPT_TIMEOUT = 5.0
#: What sending to a listener fails with when its server has gone.
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})
#: Room for a few more fds than allowed, so extra ones are received and closed
#: rather than silently dropped by the kernel (MSG_CTRUNC is still reported).
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)


@dataclass(frozen=True)
class Handle:
    """What a handle may do: its rights and the labels merged into its requests."""

    rights: frozenset[str] = frozenset(RIGHTS)
    in_labels: Mapping[str, str] = field(default_factory=dict)
    out_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Endpoint:
    """The broker's side of a listener."""

    sock: socket.socket
    send_lock: trio.Lock = field(default_factory=trio.Lock)

    def backlog(self) -> int:
        """Bytes of connection events the server has not taken yet (SIOCOUTQ)."""
        try:
            queued = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return struct.unpack("i", queued)[0]


def _backlog(target: Target) -> int:
    return target.endpoint.backlog()


class Broker:
    """The switchboard broker. See the module docstring."""

    def __init__(self, *, accept_timeout: float = ACCEPT_TIMEOUT) -> None:
        self.accept_timeout = accept_timeout
        self.registry = Registry()
        self._nursery: trio.Nursery | None = None

    # -- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve handles made with :meth:`open_handle` until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def serve(
        self, path: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve a root socket at ``path`` (mode 0600) until cancelled.

        Each connection to it is a handle with every right and no labels. A
        stale socket file is replaced; a live one is an error. Raises
        :class:`~supervisor.errors.CapvisorError` when the socket cannot be
        made. The file is removed on the way out.
        """
        listener = bind_root(path)
        identity = os.stat(path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop, listener)
                task_status.started(path)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            listener.close()
            with contextlib.suppress(OSError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
                    os.unlink(path)

    def open_handle(
        self,
        rights: Iterable[str] = RIGHTS,
        in_labels: Mapping[str, str] | None = None,
        out_labels: Mapping[str, str] | None = None,
    ) -> socket.socket:
        """A new handle with these rights and labels, as the caller's socket.

        Call from the broker's trio thread while :meth:`run` or :meth:`serve`
        is running. The caller owns the returned socket (close-on-exec).
        """
        if self._nursery is None:
            raise RuntimeError("the broker is not running")
        unknown = set(rights) - set(RIGHTS)
        if unknown:
            raise ValueError(f"unknown rights {sorted(unknown)}")
        handle = Handle(frozenset(rights), dict(in_labels or {}), dict(out_labels or {}))
        ours, theirs = socket.socketpair(socket.AF_UNIX, SEQPACKET)
        ours.setblocking(False)
        self._nursery.start_soon(self._serve_handle, ours, handle)
        return theirs

    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._nursery is not None
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # out of fds: let handles close first
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection failed, not the socket
                raise
            conn.setblocking(False)
            self._nursery.start_soon(self._serve_handle, conn, Handle())

    # -- handles -------------------------------------------------------------

    async def _serve_handle(self, sock: socket.socket, handle: Handle) -> None:
        with sock:
            for served in itertools.count(1):
                if served % 16 == 0:
                    await trio.lowlevel.checkpoint()  # a flood of requests yields now and then
                try:
                    data, fds, truncated = await _receive(sock)
                except (OSError, trio.ClosedResourceError):
                    return
                _close_all(fds)
                if data is None:
                    return
                try:
                    if truncated or fds:
                        raise ProtocolError(
                            "malformed",
                            f"requests carry no fds and at most {MAX_MESSAGE} bytes",
                        )
                    request = decode_request(data)
                except ProtocolError as exc:
                    if not await _send(sock, error_reply(None, exc.code, exc.message)):
                        return
                    if exc.code == "malformed":
                        return
                    continue
                fd: int | None = None
                try:
                    reply, fd = await self._dispatch(handle, request)
                except SwitchboardError as exc:
                    reply = error_reply(request.id, exc.code, exc.message)
                except OSError as exc:  # out of fds or memory: this request fails, not the broker
                    reason = exc.strerror or str(exc)
                    reply = error_reply(request.id, "resources", f"the switchboard: {reason}")
                try:
                    if not await _send(sock, reply, fd):
                        return
                finally:
                    if fd is not None:
                        os.close(fd)

    async def _dispatch(self, handle: Handle, request: Message) -> tuple[bytes, int | None]:
        op, fields = request.op, request.fields
        if op != "info" and op not in handle.rights:
            rights = ", ".join(sorted(handle.rights)) or "none"
            raise SwitchboardError("permission", f"this handle may not {op} (its rights: {rights})")
        if op == "info":
            return ok_reply(request.id, **_describe(handle)), None
        if op == "constrain":
            return self._constrain(handle, request)
        if op == "server_start":
            labels = merge(handle.in_labels, fields.get("labels", {}), "server_start labels")
            return ok_reply(request.id, labels=labels), self._start_server(labels)
        if op == "client_connect":
            labels = merge(handle.out_labels, fields.get("labels", {}), "client_connect labels")
            return await self._connect(labels, request.id)
        assert op == "list"
        labels = merge(handle.out_labels, fields.get("labels", {}), "list labels")
        servers = [
            {
                "labels": group.labels,
                "replicas": len(group.replicas),
                "backlog": sum(_backlog(t) for t in group.replicas),
                "connections": sum(t.delivered for t in group.replicas),
            }
            for group in self.registry.matching(labels)
        ]
        return ok_reply(request.id, servers=servers), None

    def _constrain(self, handle: Handle, request: Message) -> tuple[bytes, int]:
        fields = request.fields
        rights = set(fields.get("rights", handle.rights))
        wider = rights - handle.rights
        if wider:
            raise SwitchboardError(
                "permission", f"constrain cannot add rights this handle lacks: {sorted(wider)}"
            )
        in_labels = merge(handle.in_labels, fields.get("in_labels", {}), "constrain in_labels")
        out_labels = merge(handle.out_labels, fields.get("out_labels", {}), "constrain out_labels")
        new = Handle(frozenset(rights), in_labels, out_labels)
        sock = self.open_handle(new.rights, new.in_labels, new.out_labels)
        return ok_reply(request.id, **_describe(new)), sock.detach()

    # -- servers and connections ---------------------------------------------

    def _start_server(self, labels: Labels) -> int:
        assert self._nursery is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, SEQPACKET)
        ours.setblocking(False)
        target = Target(labels, _Endpoint(ours))
        self.registry.add(target)
        self._nursery.start_soon(self._serve_listener, target)
        return theirs.detach()

    async def _serve_listener(self, target: Target) -> None:
        """Watch a listener until the server closes it; a server sends nothing on it."""
        endpoint: _Endpoint = target.endpoint
        try:
            data, fds, _ = await _receive(endpoint.sock)
            _close_all(fds)
            if data is not None or fds:
                reply = error_reply(
                    None,
                    "malformed",
                    "a listener takes no messages: answer a connection on the "
                    "connection itself (protocol version 2)",
                )
                await _send(endpoint.sock, reply, lock=endpoint.send_lock)
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self._prune(target)

    def _prune(self, target: Target) -> None:
        """Forget a server that went away."""
        self.registry.remove(target)
        endpoint: _Endpoint = target.endpoint
        if endpoint.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(endpoint.sock)
            endpoint.sock.close()

    async def _connect(self, labels: Labels, ident: int | str | None) -> tuple[bytes, int]:
        for _ in range(ATTEMPTS):
            target = self.registry.choose(labels, load=_backlog)
            connection = {**target.labels, **labels}
            client, server = socket.socketpair(socket.AF_UNIX, STREAM)
            try:
                delivered = await self._deliver(target, connection, server.fileno())
            except BaseException:
                client.close()
                raise
            finally:
                server.close()
            if delivered:
                target.delivered += 1
                reply = ok_reply(ident, labels=connection, accept_timeout=self.accept_timeout)
                return reply, client.detach()
            client.close()
        raise unavailable(labels)

    async def _deliver(self, target: Target, labels: Labels, fd: int) -> bool:
        """Queue a connection event with ``fd`` on the target's listener.

        False when the server is gone (it is pruned); raises ``timeout`` when
        its listener stays full for the accept timeout.
        """
        endpoint: _Endpoint = target.endpoint
        event = [encode({"event": "connection", "labels": labels})]
        ancdata = [_rights(fd)]
        with trio.move_on_after(self.accept_timeout):
            while True:
                try:
                    endpoint.sock.sendmsg(event, ancdata)
                    return True
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno not in _GONE:
                        raise
                    self._prune(target)
                    return False
                try:
                    async with endpoint.send_lock:  # one task at a time waits on the socket
                        await trio.lowlevel.wait_writable(endpoint.sock)
                except trio.ClosedResourceError:  # pruned meanwhile
                    return False
        raise SwitchboardError(
            "timeout",
            f"server {format_labels(target.labels)} did not take the connection within "
            f"{self.accept_timeout:g} s (it has not taken its earlier ones)",
        )


def _describe(handle: Handle) -> dict[str, object]:
    return {
        "rights": sorted(handle.rights),
        "in_labels": dict(handle.in_labels),
        "out_labels": dict(handle.out_labels),
    }


def _rights(*fds: int) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# The broker's sockets are non-blocking stdlib sockets driven with
# wait_readable/wait_writable: an operation that can complete at once does
# so without a trip through the scheduler (trio.socket takes one per call),
# which is most of the broker's cost per connection.


async def _receive(sock: socket.socket) -> tuple[bytes | None, list[int], bool]:
    """One packet: its bytes (None at EOF), the fds it carried, whether truncated."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, ANCILLARY_SPACE, _RECV_FLAGS)
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
    fds = fds_of(ancdata)
    truncated = bool(flags & TRUNCATED)
    if not data and not fds and not truncated:
        return None, [], False
    return data, fds, truncated


async def _send(
    sock: socket.socket, data: bytes, fd: int | None = None, lock: trio.Lock | None = None
) -> bool:
    """Send one packet (with ``fd``); False when the peer is gone.

    ``lock`` serialises tasks that may have to wait on the same socket.
    """
    ancdata = [_rights(fd)] if fd is not None else []
    try:
        try:
            sock.sendmsg([data], ancdata)
            return True
        except BlockingIOError:
            pass
        async with lock if lock is not None else contextlib.nullcontext():
            while True:
                await trio.lowlevel.wait_writable(sock)
                try:
                    sock.sendmsg([data], ancdata)
                    return True
                except BlockingIOError:
                    continue
    except (OSError, trio.ClosedResourceError, trio.BusyResourceError):
        return False


def bind_root(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path``, created 0600.

    A stale socket file (nobody listening) is replaced. Raises
    :class:`CapvisorError` naming the path when that fails or when another
    broker is listening there.
    """
    sock = socket.socket(socket.AF_UNIX, SEQPACKET)
    try:
        _remove_stale(path)
        bind_private(sock, path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise CapvisorError(f"switchboard socket {path}: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise CapvisorError(f"switchboard socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, SEQPACKET)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # bind will report what is wrong
    finally:
        probe.close()
    raise CapvisorError(f"switchboard socket {path}: another switchboard is serving there")
