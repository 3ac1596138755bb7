"""Binding unix sockets that only their owner may connect to."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def short_path(path: str | Path) -> Iterator[str]:
    """``path`` itself, or ``/proc/self/fd/N/NAME`` when it is too long for sun_path."""
    path = Path(path)
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def bind_private(sock: socket.socket, path: str | Path) -> None:
    """Bind ``sock`` at ``path`` as a socket file born mode 0600.

    The mode is set on the socket's inode before ``bind`` (Linux gives the
    file that mode, less the umask), so there is no moment in which others
    may connect, and the process-wide umask, which other threads use, is
    left alone.
    """
    os.fchmod(sock.fileno(), 0o600)
    with short_path(path) as where:
        sock.bind(where)
