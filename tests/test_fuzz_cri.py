"""Fuzzing `capvisor cri serve` with random requests over its real unix socket.

One real server for the module, driven by a real gRPC client. Each example
is a short sequence of RunPodSandbox / CreateContainer / StartContainer /
status / stop / remove calls whose fields are random: annotations holding
random YAML (tags, anchors, odd scalars; see security/yamlgen.py), mounts of
random host and container paths, commands, environments, working
directories, seccomp profiles, log paths, and ids that exist or do not.
The property: every call succeeds or fails with a gRPC status the CRI
defines for bad requests, never UNKNOWN or INTERNAL and never a traceback;
the server stays up; once the example's pods are removed the server holds
the fds and children it held before (no leak, no zombie).

Budget: ``CAPVISOR_FUZZ_EXAMPLES`` (see docs/security.md), 60 examples in CI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import User
from .security.harness import Snapshot, fuzz_budget, time_limit, zombies
from .security.yamlgen import documents, mutated
from .test_fuzz_descriptions import KEYS, TAGS, WORDS

cri = pytest.importorskip("cri_api.v1.api_pb2")
from .test_cri_e2e import CriServer  # noqa: E402  (needs the cri extra, checked above)

#: What a hostile request may earn; UNKNOWN and INTERNAL are bugs, UNAVAILABLE a dead server.
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
IMAGE = "/bin/true"
SEEDS = [
    "args: [x]\n",
    "fds:\n  data: !mount /data\nlimits: {nofile: 64}\n",
    "env: {A: b}\nfds:\n  api: !server {service: api}\n",
    "fds:\n  c: !connect {service: nowhere}\n  s: !socket {bind: 'tcp:127.0.0.1:0'}\n",
    "stop: {signal: INT, timeout: 1s}\n",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriServer]:
    srv = CriServer(User("self", None), tmp_path_factory.mktemp("fuzzcri"))
    try:
        srv.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)))
        yield srv
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log


# -- random fields ----------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_paths = st.one_of(
    st.sampled_from(["/data", "/", "/etc", "/proc/self/root", "../..", "", "/nonexistent/x"]),
    _text,
)
#: Log locations stay inside the test's directory: the kubelet is trusted with them, so
#: the server (as root) creates whatever directory and file they name (docs/cri.md).
_names_only = _text.filter(lambda t: "/" not in t and t not in (".", ".."))


def _inside(directory: str) -> st.SearchStrategy[str]:
    return _names_only.map(lambda name: f"{directory}/{name}")


_yaml = st.one_of(
    documents(KEYS, WORDS, TAGS, max_leaves=12), mutated(SEEDS), st.sampled_from(SEEDS)
)
_names = st.one_of(st.sampled_from(["web", "c", "a-b"]), st.just("web"), _text)
_seccomp = st.builds(
    cri.SecurityProfile,
    profile_type=st.integers(0, 2),
    localhost_ref=st.one_of(st.just(""), _paths),
)
_security = st.builds(
    cri.LinuxContainerSecurityContext,
    seccomp=_seccomp,
    privileged=st.booleans(),
    seccomp_profile_path=st.one_of(
        st.just(""), st.sampled_from(["runtime/default", "unconfined", "localhost/x"]), _text
    ),
    run_as_user=st.builds(cri.Int64Value, value=st.integers(-1, 70000)),
    readonly_rootfs=st.booleans(),
)


def _mounts(host: str) -> st.SearchStrategy[list[object]]:
    return st.lists(
        st.builds(
            cri.Mount,
            container_path=_paths,
            host_path=st.one_of(st.just(host), _paths),
            readonly=st.booleans(),
        ),
        max_size=3,
    )


def _pod_config(logs: str) -> st.SearchStrategy[object]:
    annotations = st.dictionaries(
        st.one_of(_names.map(lambda n: f"capvisor.dev/program.{n}"), _text), _yaml, max_size=2
    )
    return st.builds(
        cri.PodSandboxConfig,
        metadata=st.builds(
            cri.PodSandboxMetadata,
            name=_names,
            namespace=_names,
            uid=_text,
            attempt=st.integers(0, 3),
        ),
        log_directory=st.one_of(st.just(logs), st.just(logs), _inside(logs)),
        annotations=annotations,
        labels=st.dictionaries(_text, _text, max_size=2),
        hostname=_text,
    )


def _container_config(host: str, image: str) -> st.SearchStrategy[object]:
    return st.builds(
        cri.ContainerConfig,
        metadata=st.builds(cri.ContainerMetadata, name=_names, attempt=st.integers(0, 2)),
        image=st.builds(
            cri.ImageSpec, image=st.one_of(st.just(image), st.just(IMAGE), st.just(IMAGE), _text)
        ),
        command=st.lists(_text, max_size=3),
        args=st.lists(_text, max_size=3),
        working_dir=st.one_of(st.just(""), _paths),
        envs=st.lists(st.builds(cri.KeyValue, key=_text, value=_text), max_size=3),
        mounts=_mounts(host),
        log_path=st.one_of(st.just("c.log"), _names_only, st.just("../c.log"), st.just("a/b")),
        linux=st.builds(cri.LinuxContainerConfig, security_context=_security),
        stop_signal=st.integers(0, 40),
    )


# -- the sequence ------------------------------------------------------------------


class Session:
    """Issues one example's calls and checks every answer."""

    def __init__(self, server: CriServer) -> None:
        self.rt = server.runtime
        self.pods: list[str] = []
        self.containers: list[str] = []

    def call(self, method: Callable[..., object], request: object) -> object | None:
        try:
            return method(request, timeout=30)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            assert code in ACCEPTABLE, f"{method}: {code.name}: {details}"
            assert "Traceback" not in details, details
            return None

    def pick(self, draw: st.DrawFn, known: list[str]) -> str:
        """An id: mostly one the server gave, else empty, random or well-formed but unknown.

        The draws never depend on what the server answered (hypothesis replays them)."""
        kind = draw(st.sampled_from(["last"] * 6 + ["any"] * 2 + ["", "text", "fixed"]))
        index, text = draw(st.integers(0, 7)), draw(_text)
        fixed = draw(st.sampled_from(["nope", "0" * 64]))
        if kind == "last" and known:
            return known[-1]
        if kind == "any" and known:
            return known[index % len(known)]
        return {"": "", "fixed": fixed}.get(kind, text)

    def step(self, draw: st.DrawFn, host: str, logs: str, image: str, op: str = "") -> None:
        op = op or draw(
            st.sampled_from(["pod", "create", "create", "start", "status", "stop", "remove"])
        )
        rt = self.rt
        if op == "pod":
            reply = self.call(
                rt.RunPodSandbox,
                cri.RunPodSandboxRequest(
                    config=draw(_pod_config(logs)),
                    runtime_handler=draw(st.one_of(st.just(""), st.just("capvisor"), _text)),
                ),
            )
            if reply is not None:
                self.pods.append(reply.pod_sandbox_id)  # type: ignore[attr-defined]
        elif op == "create":
            reply = self.call(
                rt.CreateContainer,
                cri.CreateContainerRequest(
                    pod_sandbox_id=self.pick(draw, self.pods),
                    config=draw(_container_config(host, image)),
                    sandbox_config=draw(_pod_config(logs)),
                ),
            )
            if reply is not None:
                self.containers.append(reply.container_id)  # type: ignore[attr-defined]
        elif op == "start":
            cid = self.pick(draw, self.containers)
            self.call(rt.StartContainer, cri.StartContainerRequest(container_id=cid))
        elif op == "status":
            cid, pid = self.pick(draw, self.containers), self.pick(draw, self.pods)
            verbose = draw(st.booleans())
            self.call(
                rt.ContainerStatus, cri.ContainerStatusRequest(container_id=cid, verbose=verbose)
            )
            self.call(rt.PodSandboxStatus, cri.PodSandboxStatusRequest(pod_sandbox_id=pid))
            self.call(rt.ContainerStats, cri.ContainerStatsRequest(container_id=cid))
        elif op == "stop":
            cid, pid = self.pick(draw, self.containers), self.pick(draw, self.pods)
            timeout = draw(st.integers(-5, 2))
            self.call(rt.StopContainer, cri.StopContainerRequest(container_id=cid, timeout=timeout))
            self.call(rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pid))
        else:
            cid, pid = self.pick(draw, self.containers), self.pick(draw, self.pods)
            self.call(rt.RemoveContainer, cri.RemoveContainerRequest(container_id=cid))
            self.call(rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pid))

    def clean_up(self) -> None:
        """Remove every pod and container, whoever made it."""
        for pod in self.rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items:
            self.call(self.rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
        for c in self.rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers:
            self.call(self.rt.RemoveContainer, cri.RemoveContainerRequest(container_id=c.id))


def _settle(pid: int, before: Snapshot, seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        leaks = before.leaks(Snapshot.take(pid)) + [f"zombie {z}" for z in zombies(pid)]
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(0.05)


def test_random_requests(server: CriServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    host = tmp_path_factory.mktemp("mounted")
    (host / "greeting.txt").write_text("hi\n")
    logs = tmp_path_factory.mktemp("podlogs")
    pid = server.process.pid
    image = server.images.ImageStatus(
        cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE))
    ).image.id
    # Warm up every path once (worker threads, the state databases), then measure.
    warm = Session(server)
    warm.call(
        server.runtime.RunPodSandbox,
        cri.RunPodSandboxRequest(
            config=cri.PodSandboxConfig(
                metadata=cri.PodSandboxMetadata(name="warm", namespace="n", uid="u"),
                log_directory=str(logs),
            )
        ),
    )
    warm.clean_up()
    before = Snapshot.take(pid)

    @settings(
        max_examples=fuzz_budget(60),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        session = Session(server)
        with time_limit(120):
            first = ["pod", "create", "start"]  # most examples reach a started container
            for op in [*first, *[""] * data.draw(st.integers(0, 4))]:
                session.step(data.draw, str(host), str(logs), image, op)
            assert server.process.poll() is None, server.log.read_text()
            session.clean_up()
        leaks = _settle(pid, before)
        assert not leaks, leaks

    check()
    assert server.runtime.Version(cri.VersionRequest()).runtime_name == "capvisor"
