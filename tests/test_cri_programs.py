"""Program descriptions for CRI containers: from the annotation or synthesized."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from supervisor import tags
from supervisor.cri.programs import (
    container_program,
    cri_context,
    fd_name,
    host_cwd,
    seccomp_policy,
    stop_signal,
)
from supervisor.cri.status import CriError
from supervisor.description import parse_description
from supervisor.errors import DescriptionError
from supervisor.resolve import HostMount

PROGRAM = "/store/blobs/sha256/abc"


def config(tmp_path: Path, **fields: object) -> api_pb2.ContainerConfig:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    base: dict[str, object] = {
        "metadata": api_pb2.ContainerMetadata(name="web"),
        "mounts": [
            api_pb2.Mount(container_path="/data", host_path=str(tmp_path / "data"), readonly=True),
            api_pb2.Mount(container_path="/var/out", host_path=str(tmp_path / "out")),
            api_pb2.Mount(container_path="/etc/hosts", host_path=str(tmp_path / "hosts")),
        ],
    }
    base.update(fields)
    return api_pb2.ContainerConfig(**base)  # type: ignore[arg-type]


def annotated(text: str) -> dict[str, str]:
    return {"capvisor.dev/program.web": textwrap.dedent(text)}


def test_synthesized_from_command_args_envs_working_dir_and_mounts(tmp_path) -> None:
    cfg = config(
        tmp_path,
        command=["server", "--verbose"],
        args=["--port", "8080"],
        envs=[
            api_pb2.KeyValue(key="MODE", value="1 # not a comment"),
            api_pb2.KeyValue(key="E", value=""),
        ],
        working_dir="/data/sub",
        stop_signal=api_pb2.SIGINT,
    )
    program = container_program(cfg, {}, program=PROGRAM, policy="default")
    assert program.description is None  # made of checked fields; the backend parses it
    d = parse_description(program.text, program.filename, context=cri_context(program.mounts))
    assert d.program == PROGRAM
    assert d.args == ("--verbose", "--port", "8080")
    assert dict(d.env) == {"MODE": "1 # not a comment", "E": ""}
    assert d.cwd == str(tmp_path / "data" / "sub")
    assert d.policy == "default"
    assert d.stop.signal == signal.SIGINT
    # Directory mounts become !mount fds named after the container path; file mounts are left out.
    assert {name: cap.name for name, cap in d.fds.items()} == {
        "data": "/data",
        "var-out": "/var/out",
    }
    assert all(isinstance(cap, tags.Mount) for cap in d.fds.values())
    assert program.mounts == {
        "/data": HostMount(str(tmp_path / "data"), read_only=True),
        "/var/out": HostMount(str(tmp_path / "out"), read_only=False),
    }
    assert program.filename == "container web"


def test_annotation_is_the_description_with_the_request_keys_appended(tmp_path) -> None:
    pod = annotated(
        """\
        # the web server
        args: [--root, !mount /data]
        env: {OUT: !mount /var/out}
        fds:
          api: !server {service: api}
        limits: {nofile: 64}
        stop: {signal: QUIT, timeout: 3s}
        """
    )
    cfg = config(tmp_path, working_dir="/var/out", stop_signal=api_pb2.SIGINT, args=["ignored"])
    program = container_program(cfg, pod, program=PROGRAM, policy="/etc/p.yaml")
    d = program.description
    assert program.filename == "pod annotation capvisor.dev/program.web"
    assert d.program == PROGRAM and d.policy == "/etc/p.yaml"
    assert d.cwd == str(tmp_path / "out")
    assert d.stop.signal == signal.SIGQUIT and d.stop.timeout == 3.0  # its own stop wins
    assert isinstance(d.args[1], tags.Mount) and d.args[1].name == "/data"
    assert d.limits == {"nofile": 64}
    assert isinstance(d.fds["api"], tags.Server)
    # Every line the author wrote is where it was.
    assert program.text.startswith(pod["capvisor.dev/program.web"])
    assert d.args[1].location.line == 2 and d.args[1].location.column == 16


def test_flow_style_annotation(tmp_path) -> None:
    pod = {"capvisor.dev/program.web": "{args: [x], env: {A: b}}"}
    d = container_program(config(tmp_path), pod, program=PROGRAM, policy="default").description
    assert d.program == PROGRAM and d.args == ("x",) and dict(d.env) == {"A": "b"}


def problems(tmp_path: Path, text: str, **fields: object) -> list[str]:
    with pytest.raises(DescriptionError) as err:
        container_program(
            config(tmp_path, **fields), annotated(text), program=PROGRAM, policy="default"
        )
    return [str(p) for p in err.value.problems]


def test_bad_annotation_names_line_and_column(tmp_path) -> None:
    where = "pod annotation capvisor.dev/program.web"
    assert problems(tmp_path, "args: [a]\nlimitz: {nofile: 3}\n") == [
        f"{where}:2:1: unknown key 'limitz' in description (did you mean limits?)"
    ]
    assert problems(tmp_path, "args: [a\n")[0].startswith(f"{where}:2:1: invalid YAML")
    assert problems(tmp_path, "fds:\n  d: !mount /nope\n") == [
        f"{where}:2:6: !mount /nope: no such container mount (mounts: /data, /var/out)"
    ]
    assert problems(tmp_path, "- a list\n") == [f"{where}:1:1: a description is a mapping (YAML)"]


@pytest.mark.parametrize(
    "key", ["name", "program", "policy", "runtime", "cwd", "log", "restart", "degrade"]
)
def test_keys_the_request_decides_are_refused(tmp_path, key) -> None:
    (problem,) = problems(tmp_path, f"args: []\n{key}: x\n")
    assert problem.startswith(f"pod annotation capvisor.dev/program.web:2:1: {key!r} cannot be set")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fds:\n  f: !file /etc/shadow\n", "!file is not available to CRI containers"),
        ("fds:\n  f: !mount {path: /}\n", "names a host path"),
        ("fds:\n  f: !socket {connect: 'unix:/run/docker.sock'}\n", "unix path"),
        ("fds:\n  f: !fd 3\n", "!fd is only allowed"),
    ],
)
def test_capabilities_past_the_mounts_are_refused(tmp_path, text, message) -> None:
    (problem,) = problems(tmp_path, text)
    assert problem.startswith("pod annotation capvisor.dev/program.web:2:6: ")
    assert message in problem


def test_bad_request_fields_are_named(tmp_path) -> None:
    with pytest.raises(CriError) as err:
        container_program(
            config(tmp_path, working_dir="/elsewhere"), {}, program=PROGRAM, policy="default"
        )
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("CreateContainerRequest.config.working_dir: /elsewhere")
    with pytest.raises(CriError) as err:
        container_program(
            config(tmp_path, envs=[api_pb2.KeyValue(key="A=B", value="")]),
            {},
            program=PROGRAM,
            policy="default",
        )
    assert err.value.message.startswith("CreateContainerRequest.config.envs[0].key")
    missing = config(tmp_path)
    missing.mounts.add(container_path="/m", host_path=str(tmp_path / "gone"))
    with pytest.raises(CriError) as err:
        container_program(missing, {}, program=PROGRAM, policy="default")
    assert err.value.message.startswith("CreateContainerRequest.config.mounts[3].host_path")


def security(**fields: object) -> api_pb2.LinuxContainerSecurityContext:
    return api_pb2.LinuxContainerSecurityContext(**fields)  # type: ignore[arg-type]


def profile(kind: int, ref: str = "") -> api_pb2.SecurityProfile:
    return api_pb2.SecurityProfile(profile_type=kind, localhost_ref=ref)


def test_seccomp_from_the_security_context(tmp_path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("version: 1\n")
    P = api_pb2.SecurityProfile.ProfileType
    choose = lambda ctx, allow=False: seccomp_policy(  # noqa: E731
        ctx, allow_unconfined=allow, unconfined_policy="/root/unconfined.yaml"
    )
    assert choose(security()) == "default"
    assert choose(security(seccomp=profile(P.RuntimeDefault))) == "default"
    assert choose(security(seccomp=profile(P.Localhost, str(mine)))) == str(mine)
    assert choose(security(seccomp=profile(P.Unconfined)), True) == "/root/unconfined.yaml"
    assert choose(security(seccomp_profile_path="runtime/default")) == "default"
    assert choose(security(seccomp_profile_path=f"localhost/{mine}")) == str(mine)
    for ctx, message in [
        (security(seccomp=profile(P.Unconfined)), "Unconfined is refused"),
        (security(seccomp_profile_path="unconfined"), "Unconfined is refused"),
        (security(seccomp=profile(P.Localhost, "rel.json")), "is an absolute path"),
        (security(seccomp=profile(P.Localhost, str(tmp_path / "no"))), "no such file"),
        (security(seccomp_profile_path="weird"), "unknown seccomp profile"),
    ]:
        with pytest.raises(CriError) as err:
            choose(ctx)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "CreateContainerRequest.config.linux.security_context.seccomp" in err.value.message
        assert message in err.value.message


def test_helpers() -> None:
    assert stop_signal(api_pb2.RUNTIME_DEFAULT) is None
    assert stop_signal(api_pb2.SIGTERM) == signal.SIGTERM
    assert stop_signal(api_pb2.SIGRTMINPLUS2) == signal.SIGRTMIN + 2
    assert stop_signal(api_pb2.SIGRTMAXMINUS1) == signal.SIGRTMAX - 1
    taken: set[str] = set()
    assert fd_name("/a/b", taken) == "a-b"
    assert fd_name("/a-b", taken) == "a-b.2"
    assert fd_name("/", taken) == "root"
    assert fd_name("/x y", taken) == "x_y"
    mounts = {"/d": HostMount("/host/d"), "/d/e": HostMount("/other")}
    assert host_cwd("", mounts) == "/"
    assert host_cwd("/d/x", mounts) == "/host/d/x"
    assert host_cwd("/d/e/f", mounts) == "/other/f"
    assert host_cwd("/d", mounts) == "/host/d"
