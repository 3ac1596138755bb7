"""The switchboard's sans-IO parts: label algebra, message schema, matching core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.switchboard_protocol import (
    MAX_LABELS,
    MAX_MESSAGE,
    ProtocolError,
    SwitchboardError,
    accept_timeout_of,
    answer_kind,
    compatible,
    decode_object,
    decode_request,
    encode,
    error_reply,
    merge,
    parse_label_words,
    refusal,
)
from supervisor.switchboard_registry import Registry, Target

label_keys = st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True)
label_sets = st.dictionaries(label_keys, st.text(max_size=12), max_size=6)


def test_merge_refuses_a_conflict_naming_the_labels() -> None:
    assert merge({"a": "1"}, {"b": "2"}) == {"a": "1", "b": "2"}
    assert merge({"a": "1"}, {"a": "1"}) == {"a": "1"}
    with pytest.raises(SwitchboardError) as caught:
        merge({"service": "api", "tier": "prod"}, {"service": "db"}, "constrain out_labels")
    assert caught.value.code == "conflict"
    assert "constrain out_labels" in caught.value.message
    assert "service: 'api' vs 'db'" in caught.value.message
    with pytest.raises(SwitchboardError) as caught:
        merge({f"k{i}": "v" for i in range(MAX_LABELS)}, {"one": "more"})
    assert caught.value.code == "bad_labels"


@given(label_sets, label_sets)
def test_compatible_is_symmetric_and_agrees_with_merge(a: dict, b: dict) -> None:
    assert compatible(a, b) == compatible(b, a)
    if compatible(a, b):
        merged = merge(a, b)
        assert merged.items() >= a.items() and merged.items() >= b.items()
    else:
        with pytest.raises(SwitchboardError):
            merge(a, b)


@given(label_sets, st.integers(min_value=0, max_value=2**40))
def test_requests_round_trip(labels: dict, ident: int) -> None:
    message = decode_request(encode({"op": "client_connect", "id": ident, "labels": labels}))
    assert (message.op, message.id, message.fields) == ("client_connect", ident, {"labels": labels})


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"", "malformed", "not JSON"),
        (b"\xff{}", "malformed", "not UTF-8"),
        (b"[1]", "malformed", "JSON object"),
        (b'{"v":2,"op":"list","op":"info"}', "malformed", "duplicate key 'op'"),
        (b'{"v":2,"op":"list","labels":{"a":NaN}}', "malformed", "NaN"),
        (b'{"v":2,"op":"list","labels":{"a":1}}', "malformed", "label 'a' must be a string"),
        (b'{"v":2,"op":"list","labels":{"-a":"x"}}', "bad_labels", "bad label name '-a'"),
        (b'{"v":2,"op":"list","labels":[]}', "malformed", "labels must be an object"),
        (b'{"v":2,"op":"list","colour":"red"}', "malformed", "unknown field 'colour'"),
        (b'{"v":2,"op":"constrain","rights":["root"]}', "malformed", "unknown rights"),
        (b'{"v":2,"op":"info","id":true}', "malformed", "id must be"),
        (b'{"v":2}', "malformed", 'needs "op"'),
        (b'{"v":1,"op":"info"}', "version", "unsupported protocol version 1"),
        (b'{"op":"info"}', "version", "unsupported protocol version None"),
        (b'{"v":2,"op":"reboot"}', "unknown_op", "unknown op 'reboot'"),
        (b"[" * 100000, "malformed", ""),
    ],
)
def test_bad_requests_are_named(data: bytes, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(data)
    assert caught.value.code == code
    assert words in caught.value.message


def test_sizes_and_values_are_limited() -> None:
    with pytest.raises(ProtocolError, match="longer than 1024 bytes"):
        decode_request(encode({"op": "list", "labels": {"a": "x" * 1025}}))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"op": "list", "labels": {"a": "x" * MAX_MESSAGE}})
    with pytest.raises(ProtocolError, match="longer than"):
        decode_object(b" " * (MAX_MESSAGE + 1))
    many = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    with pytest.raises(ProtocolError, match="more than 64 labels"):
        decode_request(encode({"op": "list", "labels": many}))


def test_connection_answers_and_replies() -> None:
    assert [answer_kind(b) for b in (b"\x06", b"\x15", b"")] == ["accept", "refuse", "gone"]
    with pytest.raises(ProtocolError, match="not ACCEPT or REFUSE"):
        answer_kind(b"H")  # a server that starts talking without answering
    error = refusal({"service": "db"}, "too busy \N{SNOWMAN}\n".encode() + b"x" * 2000)
    assert error.code == "refused"
    assert error.message.startswith("server {service: db} refused the connection: too busy ☃")
    assert len(error.message) < 1100  # the reason is cut at MAX_REASON
    assert refusal({}, b"").message == "server {} refused the connection"
    assert accept_timeout_of({"accept_timeout": 2}) == 2.0
    for bad in (None, True, 0, -1, float("inf"), "5"):
        with pytest.raises(ProtocolError, match="accept_timeout"):
            accept_timeout_of({"accept_timeout": bad})
    assert json.loads(error_reply(3, "no_match", "none")) == {
        "v": 2,
        "id": 3,
        "ok": False,
        "error": "no_match",
        "message": "none",
    }


def test_label_words() -> None:
    assert parse_label_words(["a=1,b=2", "c=x=y"]) == {"a": "1", "b": "2", "c": "x=y"}
    with pytest.raises(ValueError, match="'nolabel' must be NAME=VALUE"):
        parse_label_words(["nolabel"])
    with pytest.raises(ValueError, match="given twice"):
        parse_label_words(["a=1", "a=2"])


def _registry(*label_sets: dict[str, str]) -> tuple[Registry, list[Target]]:
    registry = Registry()
    targets = [Target(labels) for labels in label_sets]
    for target in targets:
        registry.add(target)
    return registry, targets


def test_matching_merges_without_conflict() -> None:
    registry, (api, db) = _registry({"service": "api"}, {"service": "db", "tier": "prod"})
    assert registry.choose({"service": "db"}) is db
    assert registry.choose({"service": "api", "caller": "x"}) is api
    with pytest.raises(SwitchboardError, match=r"no matching server for \{service: web\}"):
        registry.choose({"service": "web"})
    with pytest.raises(SwitchboardError) as caught:
        registry.choose({})
    assert caught.value.code == "ambiguous"
    assert "[service=api, service=db, tier=prod]" in caught.value.message


def test_ambiguity_names_the_labels_that_tell_servers_apart() -> None:
    registry, _ = _registry(
        {"service": "api", "instance": "1"}, {"service": "api", "instance": "2"}
    )
    with pytest.raises(SwitchboardError) as caught:
        registry.choose({"service": "api"})
    message = caught.value.message
    assert "2 servers that are not replicas match {service: api}" in message
    assert "add one of the labels [instance=1, instance=2]" in message
    assert registry.choose({"instance": "2"}).labels["instance"] == "2"


def test_replicas_round_robin_and_least_load() -> None:
    registry, (a, b, c) = _registry({"s": "x"}, {"s": "x"}, {"s": "x"})
    assert [registry.choose({}) for _ in range(6)] == [a, b, c, a, b, c]
    backlog = {a: 0, b: 900, c: 0}  # b has not taken its connections: the others go first
    assert [registry.choose({}, backlog.__getitem__) for _ in range(4)] == [a, c, a, c]
    registry.remove(a)
    registry.remove(a)  # idempotent
    assert {registry.choose({}, backlog.__getitem__) for _ in range(4)} == {c}
    assert {registry.choose({}) for _ in range(4)} == {b, c}
    registry.remove(b)
    registry.remove(c)
    assert len(registry) == 0
    with pytest.raises(SwitchboardError, match="no matching"):
        registry.choose({})


def test_the_client_module_does_not_need_trio() -> None:
    probe = "import sys, supervisor.switchboard_client; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
