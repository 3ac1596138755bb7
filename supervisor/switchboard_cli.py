"""``capvisor switchboard …``: the standalone broker, a lister, netcat and the TCP bridges.

Registered by :func:`register` into the ``capvisor`` command line. Exit
codes (docs/cli.md): 0 success (``serve``/``ingress``/``egress`` after
SIGINT or SIGTERM), 125 a switchboard error (no server, refused, timeout,
bad labels, the socket cannot be reached or made), 2 bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from .errors import CapvisorError
from .switchboard import ACCEPT_TIMEOUT, Broker
from .switchboard_bridge import egress, ingress
from .switchboard_client import Connection, Handle
from .switchboard_protocol import (
    Labels,
    ProtocolError,
    SwitchboardError,
    format_labels,
    parse_label_words,
)
from .tags import Address, parse_address


def register(commands: Any) -> None:
    """Add the ``switchboard`` command and its subcommands to ``commands``."""
    board = commands.add_parser("switchboard", help="the switchboard broker and its tools")
    sub = board.add_subparsers(dest="switchboard_command", required=True, metavar="COMMAND")
    labels_help = "labels as NAME=VALUE words (or NAME=VALUE,NAME=VALUE)"

    serve = sub.add_parser("serve", help="run a standalone broker with its root socket at PATH")
    serve.add_argument("path", metavar="PATH")
    serve.add_argument(
        "--accept-timeout",
        type=float,
        default=ACCEPT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long a server may take to accept a connection (default {ACCEPT_TIMEOUT:g})",
    )
    serve.set_defaults(handler=_serve)

    ls = sub.add_parser("ls", help="list the servers matching LABELS")
    ls.add_argument("path", metavar="PATH")
    ls.add_argument("labels", nargs="*", metavar="LABELS", help=labels_help)
    ls.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
    ls.set_defaults(handler=_ls)

    cat = sub.add_parser("cat", help="connect stdin/stdout to a server (-l: serve one connection)")
    cat.add_argument("-l", "--listen", action="store_true", help="start a server, serve one client")
    cat.add_argument("path", metavar="PATH")
    cat.add_argument("labels", nargs="*", metavar="LABELS", help=labels_help)
    cat.set_defaults(handler=_cat)

    ing = sub.add_parser("ingress", help="TCP connections become client connections to LABELS")
    ing.add_argument("--listen", required=True, type=_tcp, metavar="tcp:HOST:PORT")
    ing.add_argument("path", metavar="PATH")
    ing.add_argument("labels", nargs="*", metavar="LABELS", help=labels_help)
    ing.set_defaults(handler=_ingress)

    eg = sub.add_parser("egress", help="serve LABELS by forwarding to a TCP address")
    eg.add_argument("--to", required=True, type=_tcp, metavar="tcp:HOST:PORT")
    eg.add_argument("path", metavar="PATH")
    eg.add_argument("labels", nargs="*", metavar="LABELS", help=labels_help)
    eg.set_defaults(handler=_egress)


def _tcp(text: str) -> Address:
    try:
        address = parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if address.scheme != "tcp":
        raise argparse.ArgumentTypeError(f"{text!r}: only tcp:HOST:PORT addresses")
    return address


def _labels(words: list[str]) -> Labels:
    try:
        return parse_label_words(words)
    except ValueError as exc:
        raise CapvisorError(str(exc)) from None


def root_handle(path: str) -> Handle:
    """A root handle on the broker at ``path``; :class:`CapvisorError` naming it if unreachable."""
    with _errors(path):
        return Handle.connect(path)


def _say(message: str) -> None:
    print(f"capvisor switchboard: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
    """Turn switchboard failures into :class:`CapvisorError` naming ``path``."""
    try:
        yield
    except SwitchboardError as exc:
        raise CapvisorError(str(exc)) from exc
    except (ProtocolError, EOFError) as exc:
        raise CapvisorError(f"switchboard {path}: {exc}") from exc
    except OSError as exc:
        raise CapvisorError(f"switchboard {path}: {exc.strerror or exc}") from exc


def _run_until_signal(main: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> int:
    async def runner() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                nursery.start_soon(_cancel_on, signals, nursery.cancel_scope)
                await main(*args, **kwargs)
                nursery.cancel_scope.cancel()

    try:
        trio.run(runner)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None
    return 0


async def _cancel_on(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _serve(args: argparse.Namespace) -> int:
    broker = Broker(accept_timeout=args.accept_timeout)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(broker.serve, args.path)
            _say(f"serving {path}")

    return _run_until_signal(main)


def _ls(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)
    with _errors(args.path), Handle.connect(args.path) as handle:
        servers = handle.list(labels)
    if args.json:
        json.dump(servers, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for server in servers:
        print(
            f"{format_labels(server['labels'])}  replicas={server['replicas']} "
            f"backlog={server['backlog']} connections={server['connections']}"
        )
    return 0


def _cat(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)
    with _errors(args.path):
        with Handle.connect(args.path, timeout=None) as handle:
            if args.listen:
                with handle.server_start(labels) as listener:
                    _say(f"serving {format_labels(listener.labels)}")
                    connection = listener.accept()
            else:
                connection = handle.client_connect(labels)
        _copy(connection)
    return 0


def _copy(connection: Connection) -> None:
    """netcat: stdin to the socket (then half-close), the socket to stdout (until EOF).

    Returns when both directions have ended.
    """
    sock = connection.socket
    sock.setblocking(True)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(0, select.POLLIN)
    sending = receiving = True
    try:
        while sending or receiving:
            for fd, _ in poller.poll():
                if fd == sock.fileno():
                    data = sock.recv(65536)
                    if data:
                        _write_all(1, data)
                    else:
                        poller.unregister(sock)
                        receiving = False
                    continue
                data = os.read(0, 65536)
                try:
                    if data:
                        sock.sendall(data)
                        continue
                    sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the other side is gone: nothing more to send
                poller.unregister(0)
                sending = False
    except ConnectionResetError:
        return
    finally:
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _ingress(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(ingress, args.path, args.listen, labels)
            _say(f"ingress on {args.listen.host}:{port} to {format_labels(labels)}")

    with _errors(args.path):
        return _run_until_signal(main)


def _egress(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            served = await nursery.start(egress, args.path, labels, args.to)
            _say(f"egress {format_labels(served)} to {args.to}")

    with _errors(args.path):
        return _run_until_signal(main)
