"""The gRPC server and how its threads reach the trio backend.

Threading model: grpcio's synchronous server runs each RPC on one of
``workers`` threads of a pool. A handler thread enters trio with
:func:`trio.from_thread.run` and the trio token of the loop that owns the
backend, so every handler body runs on the trio thread — the backend is
never touched from two threads, and no lock is needed. A handler that
waits (StopContainer's timeout, ExecSync, a pull's copy in
``trio.to_thread``) yields to trio, so other RPCs go on meanwhile: at most
``workers`` RPCs are in flight, the rest queue in grpcio.

ExecSync is cancellable: when its RPC ends early (the client's deadline or
cancellation) its trio task is cancelled and the process tree killed by
the backend. The other handlers run to completion (they are short, and the
backend's changes are not cut in half).

Every RPC of ``runtime.v1.RuntimeService`` and ``runtime.v1.ImageService``
that the handlers do not implement answers UNIMPLEMENTED, naming it. A
handler's failure becomes a gRPC status (:func:`~supervisor.cri.status.status_of`);
a bug is INTERNAL, reported on stderr in one line, and the server keeps
serving.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import trio
from cri_api.v1 import api_pb2

from ..errors import CapvisorError
from .status import CriError, status_of

Handler = Callable[[Any], Awaitable[Any]]
#: RPCs whose trio task is cancelled when the RPC ends early.
CANCELLABLE = frozenset({"ExecSync"})
#: gRPC message limit: ExecSync answers up to 16 MiB on each of stdout and stderr.
MAX_MESSAGE = 40 << 20


class TrioBridge:
    """Runs async handlers on the trio loop whose token it holds, from any thread."""

    def __init__(self, token: trio.lowlevel.TrioToken, on_bug: Callable[[str], None]) -> None:
        self.token = token
        self.on_bug = on_bug

    def call(self, name: str, handler: Handler, request: Any, context: grpc.ServicerContext) -> Any:
        """Run ``handler(request)`` on the trio thread; its answer or an aborted RPC."""

        async def run() -> Any:
            if name not in CANCELLABLE:
                return await handler(request)
            with trio.CancelScope() as scope:

                def rpc_done() -> None:
                    with contextlib.suppress(trio.RunFinishedError):
                        self.token.run_sync_soon(scope.cancel)

                if not context.add_callback(rpc_done):
                    scope.cancel()
                return await handler(request)
            raise CriError(grpc.StatusCode.CANCELLED, f"{name}: the RPC ended before its answer")

        try:
            return trio.from_thread.run(run, trio_token=self.token)
        except trio.RunFinishedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "capvisor is shutting down")
        except Exception as exc:
            code, message = status_of(exc)
            if not isinstance(exc, CapvisorError):
                self.on_bug(f"{name}: {message}")
            context.abort(code, message)


def _unimplemented(full_name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def answer(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{full_name} is not implemented by capvisor")

    return answer


def generic_handlers(
    implementations: Iterable[object], bridge: TrioBridge
) -> list[grpc.GenericRpcHandler]:
    """One generic handler per CRI service, covering every RPC the proto declares.

    An RPC is served by the method of the same name of the implementation
    for its service (``RuntimeService``/``ImageService`` class name), or
    answers UNIMPLEMENTED.
    """
    by_service = {type(impl).__name__: impl for impl in implementations}
    handlers = []
    for service in api_pb2.DESCRIPTOR.services_by_name.values():
        impl = by_service.get(service.name)
        methods: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            request_type = getattr(api_pb2, method.input_type.name)
            response_type = getattr(api_pb2, method.output_type.name)
            codec = {
                "request_deserializer": request_type.FromString,
                "response_serializer": response_type.SerializeToString,
            }
            handler = getattr(impl, method.name, None) if impl is not None else None
            full_name = f"{service.full_name}/{method.name}"
            if method.server_streaming or method.client_streaming or handler is None:
                rpc = _unimplemented(full_name)
                maker = (
                    grpc.unary_stream_rpc_method_handler
                    if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler
                )
                methods[method.name] = maker(rpc, **codec)
                continue

            def rpc(
                request: Any,
                context: grpc.ServicerContext,
                name: str = method.name,
                handler: Handler = handler,
            ) -> Any:
                return bridge.call(name, handler, request, context)

            methods[method.name] = grpc.unary_unary_rpc_method_handler(rpc, **codec)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


def unix_path(listen: str) -> Path:
    """The socket path of ``unix:///PATH`` (or ``unix:PATH``); CapvisorError otherwise."""
    for prefix in ("unix://", "unix:"):
        if listen.startswith(prefix):
            path = listen[len(prefix) :]
            if path.startswith("/"):
                return Path(path)
    raise CapvisorError(f"--listen {listen}: expected unix:///absolute/path")


def _remove_stale(path: Path) -> None:
    """Remove a socket at ``path`` nobody listens on; CapvisorError if someone does."""
    if not path.is_socket():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            return
        except OSError:
            return
    raise CapvisorError(f"unix://{path}: another server is listening there")


def _report_bug(message: str) -> None:
    print(f"capvisor cri: internal error in {message}", file=sys.stderr, flush=True)


async def serve_grpc(
    listen: str,
    implementations: Iterable[object],
    *,
    workers: int = 16,
    on_bug: Callable[[str], None] = _report_bug,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the CRI services ``implementations`` on the unix socket ``listen``.

    The socket is created 0660 (a stale one is replaced); ``task_status``
    gets its path once the server accepts. Runs until cancelled, then stops
    accepting, lets in-flight RPCs finish for up to 5 s (the trio loop keeps
    running for them) and removes the socket.
    """
    path = unix_path(listen)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
    except OSError as exc:
        raise CapvisorError(f"--listen {listen}: {exc.strerror}") from exc
    bridge = TrioBridge(trio.lowlevel.current_trio_token(), on_bug)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="capvisor-cri")
    server = grpc.server(
        pool,
        handlers=generic_handlers(implementations, bridge),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ],
    )
    try:
        server.add_insecure_port(f"unix://{path}")
    except RuntimeError as exc:
        raise CapvisorError(f"--listen {listen}: cannot listen there") from exc
    server.start()
    try:
        os.chmod(path, 0o660)
        task_status.started(path)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            stopped = server.stop(grace=5)
            await trio.to_thread.run_sync(stopped.wait)
            await trio.to_thread.run_sync(pool.shutdown)  # the RPCs are done: join the workers
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
