"""A CRI container-log reader written from the spec, independent of capvisor.

kubelet's format (k8s.io/cri-api, pkg/kubelet/kuberuntime/logs): each record is
``TIMESTAMP SP STREAM SP TAG SP CONTENT LF``; TIMESTAMP is RFC 3339 with
nanoseconds, STREAM is ``stdout`` or ``stderr``, TAG is ``F`` (the record ends
a line) or ``P`` (a partial line continued by the next record of the stream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RECORD = re.compile(
    rb"(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z) (?P<stream>stdout|stderr) (?P<tag>[FP]) (?P<content>[^\n]*)\n"
)


@dataclass(frozen=True)
class Record:
    timestamp: bytes
    stream: str
    tag: str
    content: bytes


def records(data: bytes) -> list[Record]:
    """Every record of ``data``; raises ValueError at the first malformed byte."""
    out, pos = [], 0
    while pos < len(data):
        match = RECORD.match(data, pos)
        if match is None:
            raise ValueError(f"malformed CRI record at byte {pos}: {data[pos : pos + 80]!r}")
        out.append(
            Record(match["ts"], match["stream"].decode(), match["tag"].decode(), match["content"])
        )
        pos = match.end()
    return out


def stream_bytes(data: bytes, stream: str) -> bytes:
    """The bytes the program wrote to ``stream``, rebuilt from the records.

    An ``F`` record ends a line (a newline is restored); a trailing ``P`` is an
    unterminated tail.
    """
    out = bytearray()
    for record in records(data):
        if record.stream == stream:
            out += record.content
            if record.tag == "F":
                out += b"\n"
    return bytes(out)
