"""A switchboard server for the tests, run as its own process.

    python switchboard_peer.py PATH MODE NAME [LABEL=VALUE...]

Starts a server with the labels on the broker at PATH, prints ``ready`` and
then, by MODE: ``echo`` answers every connection with ``NAME:`` followed by
what it read (one connection at a time, until EOF); ``stall`` never looks at
its listener (connections to it are never accepted); ``refuse`` refuses
every connection with a reason; ``labels`` answers with the connection's
labels as JSON.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from supervisor.switchboard_client import Handle
from supervisor.switchboard_protocol import parse_label_words


def main() -> None:
    path, mode, name, *words = sys.argv[1:]
    with Handle.connect(path) as root:
        listener = root.server_start(parse_label_words(words))
    print("ready", flush=True)
    if mode == "stall":
        time.sleep(3600)
    while True:
        try:
            incoming = listener.receive()
        except EOFError:
            return
        if mode == "refuse":
            listener.answer(incoming, refuse=f"{name} is closed")
            continue
        listener.answer(incoming)
        if mode == "labels":
            with incoming.socket as conn:
                conn.sendall(json.dumps(incoming.labels, sort_keys=True).encode())
            continue
        with incoming.socket as conn:
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
            with contextlib.suppress(OSError):  # the client may be gone already
                conn.sendall(f"{name}:".encode() + b"".join(chunks))


if __name__ == "__main__":
    main()
