"""``capvisor cri serve``: the CRI frontend's command.

Exit codes (docs/cli.md): 0 after SIGINT or SIGTERM (a clean stop: running
containers are stopped by the backend), 125 when the server cannot start
(bad ``--listen``, unusable ``--root``, the ``cri`` extra not installed).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ..errors import CapvisorError


def register(commands: Any) -> None:
    """Add ``cri serve`` to the ``capvisor`` subcommands ``commands``."""
    cri = commands.add_parser("cri", help="serve Kubernetes' Container Runtime Interface")
    actions = cri.add_subparsers(dest="cri_command", required=True, metavar="ACTION")
    serve = actions.add_parser(
        "serve",
        help="serve CRI v1 (RuntimeService, ImageService) on a unix socket",
        description="Serve the CRI v1 RuntimeService and ImageService on a unix socket; "
        "runs until SIGINT or SIGTERM (docs/cri.md).",
    )
    serve.add_argument(
        "--listen",
        default="unix:///run/capvisor/cri.sock",
        metavar="unix://PATH",
        help="the socket to serve on (default: %(default)s)",
    )
    serve.add_argument(
        "--root",
        default="/var/lib/capvisor/cri",
        metavar="DIR",
        help="images, state and generated files (default: %(default)s)",
    )
    serve.add_argument(
        "--allow-unconfined",
        action="store_true",
        help="accept seccomp profile Unconfined (all syscalls allowed and logged)",
    )
    serve.add_argument(
        "--switchboard",
        metavar="PATH",
        help="the switchboard broker's root socket (default: ROOT/switchboard.sock)",
    )
    serve.add_argument(
        "--workers", type=int, default=16, help="gRPC worker threads (default: %(default)s)"
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from .main import serve
    except ImportError as exc:
        raise CapvisorError(
            f"capvisor cri needs grpcio and the CRI messages ({exc.name} is missing): "
            "pip install 'capvisor[cri]'"
        ) from exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(
                lambda task_status: serve(
                    args.listen,
                    Path(args.root),
                    allow_unconfined=args.allow_unconfined,
                    workers=args.workers,
                    switchboard=args.switchboard,
                    task_status=task_status,
                )
            )
            print(f"capvisor cri: serving unix://{path}", file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for _ in received:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _first_error(group) from group
    return 0


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The CapvisorError inside ``group`` (a trio nursery's), else the group itself."""
    matched, _ = group.split(CapvisorError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched if matched is not None else group
