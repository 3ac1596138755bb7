"""The switchboard wire protocol and label algebra, shared by broker and clients.

Sans-IO and standard library only (no trio), so programs can use it through
:mod:`supervisor.switchboard_client`. The document is docs/switchboard.md;
this module is its executable form:

- a message is one SOCK_SEQPACKET packet holding one JSON object (UTF-8),
  at most :data:`MAX_MESSAGE` bytes; fds travel in SCM_RIGHTS;
- requests name an ``op``; replies echo the request's ``id``;
- a server answers a delivered connection on the connection itself, before
  any data: :data:`ACCEPT`, or :data:`REFUSE` followed by a reason and EOF;
- labels are string → string maps; merging two label sets fails on a key
  both have with different values (a *conflict*).
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Protocol version carried in every message as ``"v"``. Version 2 moved the
#: server's answer from the listener onto the connection (one hop less).
VERSION = 2
#: Largest message, in bytes, either direction.
MAX_MESSAGE = 65536
#: Most fds a message may carry: requests carry none, replies and events one.
MAX_FDS = 1
#: Most labels in one label set (after merging).
MAX_LABELS = 64
#: Longest label value, in bytes of UTF-8.
MAX_LABEL_VALUE = 1024
#: A label name: as in descriptions (``!server {service: api}``).
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,252}")

#: The rights a handle may have; the root socket's handles have all of them.
RIGHTS = ("server_start", "client_connect", "list", "constrain")

#: Request fields by op (besides ``v``, ``op`` and ``id``).
REQUEST_FIELDS: dict[str, tuple[str, ...]] = {
    "info": (),
    "constrain": ("rights", "in_labels", "out_labels"),
    "server_start": ("labels",),
    "client_connect": ("labels",),
    "list": ("labels",),
}
#: The server's answer, the first byte it writes on a delivered connection:
#: ASCII ACK accepts; ASCII NAK refuses, followed by a UTF-8 reason and EOF.
ACCEPT = b"\x06"
REFUSE = b"\x15"
#: Longest refusal reason a client reads, in bytes.
MAX_REASON = 1024
#: Tries of one ``client_connect`` when the chosen server goes away before
#: answering (the broker then picks another replica).
ATTEMPTS = 3

#: Error codes of failed replies (docs/switchboard.md, "Errors").
ERRORS = (
    "malformed",  # not a valid message; the handle is closed after this reply
    "version",  # unsupported "v"
    "unknown_op",  # an op this broker does not know
    "permission",  # the handle lacks the right for the op
    "conflict",  # merging label sets met a key with two values
    "bad_labels",  # too many labels, a bad name or value
    "no_match",  # no server matches the labels
    "ambiguous",  # several servers that are not replicas match
    "timeout",  # the server did not answer in time (reported by the client side)
    "refused",  # the server refused the connection (reported by the client side)
    "unavailable",  # the matching servers went away while connecting
    "resources",  # the broker is out of fds or memory for this request
)

Labels = dict[str, str]


class ProtocolError(Exception):
    """A message that does not follow the protocol; ``code`` is from :data:`ERRORS`."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class SwitchboardError(Exception):
    """A request the broker refused; ``code`` is from :data:`ERRORS`."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})")


# -- labels ------------------------------------------------------------------


def format_labels(labels: Mapping[str, str]) -> str:
    """``{service: api, tier: prod}``, keys sorted; ``{}`` when empty."""
    return "{" + ", ".join(f"{k}: {labels[k]}" for k in sorted(labels)) + "}"


def conflicts(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The keys present in both with different values, sorted."""
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def compatible(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether ``a`` and ``b`` merge without a conflict."""
    return all(b.get(k, v) == v for k, v in a.items())


def merge(base: Mapping[str, str], extra: Mapping[str, str], what: str = "labels") -> Labels:
    """``base`` plus ``extra``; raises :class:`SwitchboardError` ``conflict`` naming the keys."""
    clash = conflicts(base, extra)
    if clash:
        detail = ", ".join(f"{k}: {base[k]!r} vs {extra[k]!r}" for k in clash)
        raise SwitchboardError("conflict", f"{what}: conflicting label values ({detail})")
    merged = {**base, **extra}
    if len(merged) > MAX_LABELS:
        raise SwitchboardError("bad_labels", f"{what}: more than {MAX_LABELS} labels")
    return merged


def check_labels(value: Any, what: str) -> Labels:
    """Validate a label map from a message; raises :class:`ProtocolError`."""
    if not isinstance(value, dict):
        raise ProtocolError("malformed", f"{what} must be an object of strings")
    if len(value) > MAX_LABELS:
        raise ProtocolError("bad_labels", f"{what}: more than {MAX_LABELS} labels")
    for key, item in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise ProtocolError("bad_labels", f"{what}: bad label name {key!r}")
        if not isinstance(item, str):
            raise ProtocolError("malformed", f"{what}: label {key!r} must be a string")
        if len(item.encode()) > MAX_LABEL_VALUE:
            raise ProtocolError(
                "bad_labels", f"{what}: label {key!r} is longer than {MAX_LABEL_VALUE} bytes"
            )
    return dict(value)


def parse_label_words(words: Iterable[str]) -> Labels:
    """``["service=api", "tier=prod,zone=a"]`` → labels; raises ValueError naming the word."""
    labels: Labels = {}
    for word in words:
        for part in word.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not LABEL_KEY.fullmatch(key):
                raise ValueError(f"label {part!r} must be NAME=VALUE (names: {LABEL_KEY.pattern})")
            if labels.get(key, value) != value:
                raise ValueError(f"label {key!r} given twice with different values")
            labels[key] = value
    return labels


# -- messages ----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A decoded request, checked against :data:`REQUEST_FIELDS`."""

    op: str
    id: int | str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as compact UTF-8 JSON, ``"v"`` first."""
    data = _ENCODER.encode({"v": VERSION, **message}).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("malformed", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError("malformed", f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ProtocolError("malformed", f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def decode_object(data: bytes) -> dict[str, Any]:
    """Parse one packet into a JSON object; raises :class:`ProtocolError` ``malformed``."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("malformed", f"message longer than {MAX_MESSAGE} bytes")
    try:
        obj = _DECODER.decode(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed", f"not UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError("malformed", f"not JSON: {exc.msg} at byte {exc.pos}") from None
    except RecursionError:
        raise ProtocolError("malformed", "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", "a message must be a JSON object")
    return obj


def decode_request(data: bytes) -> Message:
    """A request on a handle; raises :class:`ProtocolError`."""
    obj = decode_object(data)
    ident = obj.get("id")
    if ident is not None and (
        isinstance(ident, bool)
        or not isinstance(ident, int | str)
        or (isinstance(ident, str) and len(ident) > 256)
    ):
        raise ProtocolError("malformed", "id must be an integer or a short string")
    version = obj.get("v")
    if version != VERSION:
        raise ProtocolError(
            "version", f"unsupported protocol version {version!r} (this is {VERSION})"
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("malformed", 'a request needs "op"')
    if op not in REQUEST_FIELDS:
        known = ", ".join(REQUEST_FIELDS)
        raise ProtocolError("unknown_op", f"unknown op {op!r} (known: {known})")
    allowed = REQUEST_FIELDS[op]
    fields = {k: v for k, v in obj.items() if k not in ("v", "op", "id")}
    for key in fields:
        if key not in allowed:
            raise ProtocolError("malformed", f"{op}: unknown field {key!r}")
    for key in ("labels", "in_labels", "out_labels"):
        if key in fields:
            fields[key] = check_labels(fields[key], key)
    if "rights" in fields:
        rights = fields["rights"]
        if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
            raise ProtocolError("malformed", "rights must be a list of strings")
        unknown = [r for r in rights if r not in RIGHTS]
        if unknown:
            raise ProtocolError("malformed", f"unknown rights {unknown} (rights: {list(RIGHTS)})")
    return Message(op, ident, fields)


# -- the server's answer on a connection ---------------------------------------


def answer_kind(first: bytes) -> str:
    """What the first byte a client reads says: ``accept``, ``refuse`` or ``gone`` (EOF).

    Raises :class:`ProtocolError` for any other byte.
    """
    if first == ACCEPT:
        return "accept"
    if first == REFUSE:
        return "refuse"
    if not first:
        return "gone"
    raise ProtocolError("malformed", f"the server answered {first!r}, not ACCEPT or REFUSE")


def accept_timeout_of(reply: Mapping[str, Any]) -> float:
    """The ``accept_timeout`` of a ``client_connect`` reply, seconds (positive, finite)."""
    value = reply.get("accept_timeout")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise ProtocolError("malformed", f"the client_connect reply has accept_timeout {value!r}")
    return float(value)


def refusal(labels: Mapping[str, str], reason: bytes) -> SwitchboardError:
    """The ``refused`` error for a server's REFUSE and its (possibly empty) reason."""
    text = reason[:MAX_REASON].decode("utf-8", "replace").strip()
    detail = f": {text}" if text else ""
    return SwitchboardError(
        "refused", f"server {format_labels(labels)} refused the connection{detail}"
    )


def answer_timeout(labels: Mapping[str, str], seconds: float) -> SwitchboardError:
    """The ``timeout`` error for a server that did not answer within ``seconds``."""
    return SwitchboardError(
        "timeout",
        f"server {format_labels(labels)} did not accept the connection within {seconds:g} s",
    )


def unavailable(labels: Mapping[str, str]) -> SwitchboardError:
    """The ``unavailable`` error: the matching servers went away while connecting."""
    return SwitchboardError(
        "unavailable", f"the servers matching {format_labels(labels)} went away"
    )


def ok_reply(ident: int | str | None, **fields: Any) -> bytes:
    """A successful reply to the request ``ident``."""
    return encode({"id": ident, "ok": True, **fields})


def error_reply(ident: int | str | None, code: str, message: str) -> bytes:
    """A failed reply to the request ``ident``."""
    return encode({"id": ident, "ok": False, "error": code, "message": message})


def check_reply(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """A decoded reply, or :class:`SwitchboardError` when it reports a failure."""
    if obj.get("ok") is True:
        return obj
    code = obj.get("error")
    message = obj.get("message")
    raise SwitchboardError(
        code if isinstance(code, str) else "malformed",
        message if isinstance(message, str) else f"a reply without ok: {obj!r}",
    )


#: recvmsg flags of a message that did not fit (plain ints: enum arithmetic
#: costs microseconds per message on the broker's hot path).
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
#: Socket types of a handle or listener and of a connection, close-on-exec.
SEQPACKET = int(socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
STREAM = int(socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

#: Ancillary buffer for receiving: room for more fds than allowed, so an
#: oversized batch is seen (and closed) rather than truncated.
ANCILLARY_SPACE = socket.CMSG_SPACE(4 * (MAX_FDS + 7))


def fds_of(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds an ``SCM_RIGHTS`` message carried (``recvmsg``'s ancdata)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


def decode_received(
    data: bytes, ancdata: Iterable[tuple[int, int, bytes]], flags: int
) -> tuple[dict[str, Any], int | None]:
    """A message from the switchboard and the fd it carried, as ``recvmsg`` gave them.

    Raises :class:`EOFError` when the switchboard closed the socket and
    :class:`ProtocolError` for a malformed message; extra fds are closed.
    """
    fds = fds_of(ancdata)
    try:
        if not data and not fds:
            raise EOFError("the switchboard closed the socket")
        if flags & TRUNCATED or len(fds) > MAX_FDS:
            raise ProtocolError("malformed", "oversized message from the switchboard")
        return decode_object(data), (fds.pop() if fds else None)
    finally:
        for fd in fds:
            os.close(fd)
