"""Putting the CRI frontend together: images, switchboard, backend, handlers, gRPC."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import trio

from ..errors import CapvisorError
from ..service import open_service
from ..switchboard import Broker
from ..switchboard_client import Handle
from .image_service import ImageService
from .images import ImageStore
from .runtime_service import RuntimeService
from .server import serve_grpc


class SharedHandle:
    """A root switchboard handle the backend's resolver threads may share.

    Requests on one handle are answered in order, so concurrent callers
    take turns (a ``!connect`` waits for at most the broker's accept timeout).
    """

    def __init__(self, handle: Handle) -> None:
        self._handle = handle
        self._lock = threading.Lock()

    def server_handle(self, labels: Mapping[str, str]) -> int:
        with self._lock:
            return self._handle.server_handle(labels)

    def client_handle(self, labels: Mapping[str, str]) -> int:
        with self._lock:
            return self._handle.client_handle(labels)

    def connect_fd(self, labels: Mapping[str, str]) -> int:
        with self._lock:
            return self._handle.connect_fd(labels)

    def close(self) -> None:
        self._handle.close()


def _say(message: str) -> None:
    print(f"capvisor cri: {message}", file=sys.stderr, flush=True)


async def serve(
    listen: str,
    root: Path,
    *,
    allow_unconfined: bool = False,
    workers: int = 16,
    switchboard: str | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve CRI v1 on ``listen`` with images and state under ``root``, until cancelled.

    The switchboard broker's root socket is ``switchboard`` (default
    ``ROOT/switchboard.sock``), for ``capvisor switchboard`` and its bridges.
    ``task_status`` gets the CRI socket path once the server accepts. On
    cancellation the gRPC server stops first (in-flight RPCs finish), then
    the backend stops every running container, then the broker. Raises
    :class:`~supervisor.errors.CapvisorError` if ``root`` is unusable or a
    socket cannot be created.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        images = ImageStore(root / "images")
    except OSError as exc:
        raise CapvisorError(f"--root {root}: {exc.strerror}") from exc
    broker = Broker()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, switchboard or str(root / "switchboard.sock"))
        board = SharedHandle(Handle(broker.open_handle()))
        try:
            async with open_service(root / "state", switchboard=board, on_event=_say) as service:
                runtime = RuntimeService(service, images, root, allow_unconfined=allow_unconfined)
                try:
                    await serve_grpc(
                        listen,
                        [runtime, ImageService(images)],
                        workers=workers,
                        task_status=task_status,
                    )
                finally:
                    runtime.close()
        finally:
            board.close()
            nursery.cancel_scope.cancel()
