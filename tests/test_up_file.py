"""Set files for `capvisor up` (supervisor/upfile.py), without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.description import parse_description
from supervisor.errors import DescriptionError
from supervisor.upfile import load_upfile, socket_path


def write(tmp_path: Path, text: str, name: str = "set.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_order_and_inline_text(tmp_path: Path) -> None:
    (tmp_path / "db.yaml").write_text("program: /bin/true\nrestart: {policy: always}\n")
    path = write(
        tmp_path,
        "programs:\n"
        "  web:\n"
        "    program: /bin/sh\n"
        "    args: [-c, 'echo hi']\n"
        "    fds: {d: !mount {path: /tmp, mode: ro}}\n"
        "    after: [db]\n"
        "  db: {description: db.yaml}\n",
    )
    up = load_upfile(path)
    assert list(up.programs) == ["db", "web"]  # `after` first
    assert up.state_dir == tmp_path / ".capvisor-set"
    assert up.log_dir == up.state_dir / "logs" and up.socket == up.state_dir / "control.sock"
    assert not up.switchboard
    db, web = up.programs["db"], up.programs["web"]
    assert db.file == str(tmp_path / "db.yaml") and db.description.restart.policy == "always"
    assert web.after == ("db",) and web.description.name == "web"
    # The text stored for the service is the same description, tags included.
    again = parse_description(web.text, web.file)
    assert again.args == web.description.args and again.name == "web"
    assert again.fds["d"].path == "/tmp"  # type: ignore[attr-defined]
    assert socket_path(path) == up.socket


def test_every_problem_at_once_with_locations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "statee: x\n"
        "programs:\n"
        "  a: {program: /bin/true, after: [nope]}\n"
        "  b: {description: missing.yaml}\n"
        "  c: {program: /bin/true, limits: {nofile: lots}}\n"
        "  d: [not, a, mapping]\n",
    )
    with pytest.raises(DescriptionError) as caught:
        load_upfile(path)
    text = str(caught.value)
    assert f"{path}:1:1: unknown key 'statee' in set file (did you mean state?)" in text
    assert f"{path}:3:3: programs.a.after: no program 'nope'" in text
    assert f"{path}:4:20: programs.b.description: no such file: {tmp_path}/missing.yaml" in text
    assert f"{path}:5:44: limits.nofile" in text
    assert f"{path}:6:6: programs.d must be a description" in text


def test_after_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "programs:\n  a: {program: /bin/true, after: [nope]}\n")
    with pytest.raises(
        DescriptionError, match=r"set.yaml:2:3: programs.a.after: no program 'nope'"
    ):
        load_upfile(path)
    path = write(
        tmp_path,
        "programs:\n"
        "  a: {program: /bin/true, after: [c]}\n"
        "  b: {program: /bin/true, after: a}\n"
        "  c: {program: /bin/true, after: [b]}\n",
    )
    with pytest.raises(DescriptionError, match="cycle: a -> c -> b -> a"):
        load_upfile(path)


def test_socket_path_is_found_while_the_rest_is_broken(tmp_path: Path) -> None:
    path = write(tmp_path, "socket: ctl.sock\nprograms: {a: {bogus: 1}}\n")
    assert socket_path(path) == tmp_path / "ctl.sock"
    with pytest.raises(DescriptionError):
        load_upfile(path)
