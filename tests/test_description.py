"""Program descriptions: the model, the tags and every error's location."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor import tags
from supervisor.description import Description, load_description, parse_description
from supervisor.errors import DescriptionError
from supervisor.tags import Context


def parse(text: str, **kwargs: object) -> Description:
    return parse_description(textwrap.dedent(text), "prog.yaml", **kwargs)  # type: ignore[arg-type]


def problems(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(DescriptionError) as info:
        parse(text, **kwargs)
    return [str(p) for p in info.value.problems]


def test_full_description_from_design() -> None:
    d = parse(
        """\
        program: /usr/bin/python3
        args: [-m, myapp, --port-fd, !socket {bind: "tcp:127.0.0.1:8080"}]
        env: {LANG: C.UTF-8}
        stdout: !log stdout
        stderr: !log stderr
        fds:
          data: !mount {path: /srv/data, mode: ro}
          db:   !file {path: /srv/db.sqlite, mode: rw}
          api:  !server {service: api}
        policy: service
        limits: {nofile: 256, nproc: 64, as: 1G, cpu: 60s, fsize: 100M}
        restart: {policy: on-failure, backoff: 1s..60s}
        stop: {signal: TERM, timeout: 10s}
        """
    )
    assert d.program == "/usr/bin/python3"
    assert d.args[:3] == ("-m", "myapp", "--port-fd")
    sock = d.args[3]
    assert isinstance(sock, tags.Socket) and sock.type == "stream" and sock.backlog == 128
    assert str(sock.bind) == "tcp:127.0.0.1:8080"
    assert sock.location is not None and (sock.location.line, sock.location.column) == (2, 30)
    assert d.env == {"LANG": "C.UTF-8"}
    assert list(d.fds) == ["data", "db", "api"]
    assert isinstance(d.fds["data"], tags.Mount) and d.fds["data"].mode == "ro"
    assert isinstance(d.fds["db"], tags.File) and d.fds["db"].mode == "rw"
    assert isinstance(d.fds["api"], tags.Server) and d.fds["api"].labels == {"service": "api"}
    assert d.policy == "service"
    assert d.limits == {
        "nofile": 256,
        "nproc": 64,
        "as": 1 << 30,
        "cpu": 60,
        "fsize": 100 << 20,
    }
    assert (d.restart.policy, d.restart.backoff_min, d.restart.backoff_max) == (
        "on-failure",
        1.0,
        60.0,
    )
    assert d.stop.signal == signal.SIGTERM and d.stop.timeout == 10.0


def test_defaults() -> None:
    d = parse("program: /bin/true\n")
    assert isinstance(d.stdin, tags.File) and d.stdin.path == "/dev/null"
    assert isinstance(d.stdout, tags.Log) and d.stdout.stream == "stdout"
    assert isinstance(d.stderr, tags.Log) and d.stderr.stream == "stderr"
    assert d.policy == "default" and d.degrade == "deny" and d.cwd == "/"
    assert d.name == "prog"


@pytest.mark.parametrize(
    "tag",
    [
        "!fd stdout",
        "!<tag:capvisor.dev,2026:fd> stdout",
        "!<tag:nuxi.nl,2015:cloudabi/fd> stdout",
    ],
)
def test_tag_spellings(tag: str) -> None:
    d = parse(f"program: /bin/true\nfds: {{out: {tag}}}\n")
    fd = d.fds["out"]
    assert isinstance(fd, tags.Fd) and fd.number == 1


def test_tag_directive_long_form() -> None:
    d = parse(
        "%TAG !cv! tag:capvisor.dev,2026:\n---\nprogram: /bin/true\nfds: {x: !cv!executable }\n"
    )
    assert isinstance(d.fds["x"], tags.Executable)


def test_alias_is_one_capability() -> None:
    d = parse(
        """\
        program: /bin/true
        fds: {sock: &s !socket {bind: "unix:@x"}}
        args: [--fd, *s]
        """
    )
    assert d.args[1] is d.fds["sock"]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp:127.0.0.1:80", tags.Address("tcp", host="127.0.0.1", port=80)),
        ("tcp:[::1]:8080", tags.Address("tcp", host="::1", port=8080)),
        ("udp:0.0.0.0:53", tags.Address("udp", host="0.0.0.0", port=53)),
        ("unix:/run/x.sock", tags.Address("unix", path="/run/x.sock")),
        ("unix:@name", tags.Address("unix", path="name", abstract=True)),
    ],
)
def test_addresses(address: str, expected: tags.Address) -> None:
    assert tags.parse_address(address) == expected
    assert str(tags.parse_address(address)) == address


def test_unknown_tag_suggests() -> None:
    assert problems("program: /bin/true\nfds:\n  data: !mnt {path: /x}\n") == [
        "prog.yaml:3:9: unknown tag !mnt (did you mean !mount?)"
    ]


def test_all_problems_at_once_in_file_order() -> None:
    found = problems(
        """\
        program: bin/true
        argz: []
        args: [ok, !log nowhere]
        env: {"1BAD": x, GOOD: !fd 1, LISTEN_FDS: "3"}
        fds:
          a: !file {path: /x, mode: rx}
          b: !socket {bind: "tcp:1.2.3.4:99999"}
          c: plain
          d: !socket {bind: "unix:/x", connect: "unix:/y"}
          e: !mount data
        limits: {nofile: many, as: 1Q, cpux: 1}
        restart: {policy: sometimes, backoff: 9s..1s}
        stop: {signal: TERN, timeout: soon}
        stdin: !log stdout
        stdout: !mount {path: /x}
        degrade: maybe
        """
    )
    assert found == [
        "prog.yaml:1:10: program must be an absolute path: 'bin/true'",
        "prog.yaml:2:1: unknown key 'argz' in description (did you mean args?)",
        "prog.yaml:3:12: !log takes stdout or stderr, not 'nowhere'",
        "prog.yaml:4:7: bad environment variable name '1BAD'",
        "prog.yaml:4:31: LISTEN_FDS is set by capvisor from fds",
        "prog.yaml:6:29: !file: mode must be one of r, w, a, rw, not 'rx'",
        "prog.yaml:7:21: !socket: address 'tcp:1.2.3.4:99999': port must be a number from 0 to 65535",
        "prog.yaml:8:6: fds.c must be a capability tag such as !file or !mount",
        "prog.yaml:9:6: !socket needs exactly one of bind or connect",
        "prog.yaml:10:6: !mount data names a mount of the enclosing container; "
        "a standalone description uses !mount {path: /dir, mode: ro}",
        "prog.yaml:11:18: limits.nofile: expected a number or unlimited, not 'many'",
        "prog.yaml:11:28: limits.as: expected a size such as 64M or 1G, or unlimited, not '1Q'",
        "prog.yaml:11:32: unknown limit 'cpux' (did you mean cpu?)",
        "prog.yaml:12:19: restart.policy must be no, on-failure or always",
        "prog.yaml:12:39: restart.backoff must look like 1s..60s, not '9s..1s'",
        "prog.yaml:13:16: stop.signal: unknown signal 'TERN'",
        "prog.yaml:13:31: stop.timeout must be a duration such as 10s",
        "prog.yaml:14:8: !log cannot be used as stdin",
        "prog.yaml:15:9: !mount cannot be used as stdout",
        "prog.yaml:16:10: degrade must be deny or allow",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("program: [1\n", "prog.yaml:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("program: /a\nprogram: /b\n", 'prog.yaml:2:1: invalid YAML: found duplicate key "program"'),
        ("fds: {a: !fd 1, a: !fd 2}\n", 'prog.yaml:1:17: invalid YAML: found duplicate key "a"'),
        ("- /bin/true\n", "prog.yaml:1:1: a description is a mapping with at least a 'program' key"),
        ("args: []\n", "prog.yaml:1:1: missing required key 'program'"),
        ("program: /bin/true\nfds: {x: !fd nope}\n", "prog.yaml:2:10: !fd takes stdin, stdout, stderr or a number, not 'nope'"),
        ("program: /bin/true\nfds: {x: !executable yes}\n", "prog.yaml:2:10: !executable takes no value"),
        ("program: /bin/true\nfds: {x: !server [a]}\n", "prog.yaml:2:10: !server takes a mapping of labels, e.g. !server {service: api}"),
        ("program: /bin/true\nfds: {x: !client {a: [1]}}\n", "prog.yaml:2:22: !client: label 'a' must have a string value"),
        ("program: /bin/true\nfds: {x: !file {path: /x, create: true}}\n", "prog.yaml:2:35: !file: create needs a writable mode (w, a or rw)"),
        ("program: /bin/true\nfds: {x: !socket {bind: 'udp:1.1.1.1:1', type: stream}}\n", "prog.yaml:2:48: !socket: udp addresses need type dgram"),
        ("program: /bin/true\nfds: {x: !mount {path: /x, mod: ro}}\n", "prog.yaml:2:28: unknown key 'mod' in !mount (did you mean mode?)"),
        ("program: /bin/true\nfds: {x: !file {? {a: 1} : 2, path: /x}}\n", "prog.yaml:2:19: a mapping cannot be a key in !file (keys: path, mode, create)"),
        ("program: /bin/true\nfds:\n  ? {path: /x}\n  : !fd 1\n", "prog.yaml:3:5: bad fd name {…} (letters, digits, '_', '.', '-'; at most 255)"),
        ("program: /bin/true\nenv: {? [a] : b}\n", "prog.yaml:2:9: bad environment variable name […]"),
        ("program: /bin/true\n? [x]\n: 3\n", "prog.yaml:2:3: a sequence cannot be a key in description (keys: name, program, args, env, cwd, stdin, stdout, stderr, fds, policy, limits, runtime, degrade, restart, stop, log, audit)"),
        ("program: /bin/true\nfds: {'a:b': !fd 1}\n", "prog.yaml:2:7: bad fd name 'a:b' (letters, digits, '_', '.', '-'; at most 255)"),
        ("program: /bin/true\nargs: [!!binary aGk=]\n", "prog.yaml:2:8: args[0] must be a string, a number or a capability tag"),
        ("program: /bin/true\nruntime: [lib]\n", "prog.yaml:2:11: runtime[0] must be an absolute path"),
    ],
)  # fmt: skip
def test_single_problem(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_fd_tag_forbidden_outside_cli() -> None:
    assert problems("program: /bin/true\nfds: {x: !fd 1}\n", context=Context(allow_fd=False)) == [
        "prog.yaml:2:10: !fd is only allowed in descriptions run from the command line"
    ]


def test_named_mount_in_container_context() -> None:
    context = Context(mounts={"/data": object()})
    d = parse("program: /bin/true\nfds: {d: !mount /data}\n", context=context)
    mount = d.fds["d"]
    assert isinstance(mount, tags.Mount) and mount.name == "/data"
    assert problems("program: /bin/true\nfds: {d: !mount /nope}\n", context=context) == [
        "prog.yaml:2:10: !mount /nope: no such container mount (mounts: /data)"
    ]


def test_unreadable_and_non_utf8_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DescriptionError, match="No such file or directory"):
        load_description(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"program: /bin/\xff\n")
    with pytest.raises(DescriptionError, match="not UTF-8"):
        load_description(bad)


def test_yes_no_stay_strings_in_yaml_1_2() -> None:
    d = parse("program: /bin/true\nargs: [yes, no, on]\nrestart: {policy: no}\n")
    assert d.args == ("yes", "no", "on")
    assert d.restart.policy == "no"


@pytest.mark.parametrize(
    ("command", "text", "where"),
    [
        (["check"], "program: /bin/true\nargs: [!!str clone, !!int clone]\n", "2:21"),
        (["policy", "check"], "[!!str clone, !!int clone, &b 0x1F, &b 0x1F]\n", "1:15"),
    ],
)
def test_a_failed_yaml_load_prints_only_its_problem(
    tmp_path: Path, command: list[str], text: str, where: str
) -> None:
    # ruamel leaves a half-run generator behind when a load fails part-way;
    # collected later, it used to print "Exception ignored in ...
    # construct_unknown" and a traceback after the located message.
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", *command, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 125
    assert proc.stderr == (
        f"{path}:{where}: invalid YAML: the value does not fit its tag"
        " (invalid literal for int() with base 10: 'clone')\n"
    )
