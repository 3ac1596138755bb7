"""End to end: a real `capvisor cri serve` driven by a real gRPC client over its unix socket.

The server is the real command line, run as root and as uid 65534. The
client walks the sequence a kubelet (and crictl) goes through, each step
repeated where the CRI promises idempotency; the containers are real
confined programs (a small C program and /bin/sh) whose log the test reads.
A second test runs two pods whose containers talk through the switchboard.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc

from supervisor import policy
from supervisor.policy_oci import export_oci
from tests.conftest import PYTHON, User

REPO = Path(__file__).resolve().parent.parent

PROGRAM_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void nap(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void greeting(void) {  /* fd 3 is the read-only mount /data */
    char buf[128] = {0};
    int f = openat(3, "greeting.txt", O_RDONLY);
    if (f < 0 || read(f, buf, sizeof buf - 1) < 0) printf("greeting: %s\n", strerror(errno));
    else printf("greeting: %s", buf);
}

static const char *try_open(int dir, const char *path, int flags) {
    return openat(dir, path, flags, 0644) >= 0 ? "ALLOWED" : strerror(errno);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "serve";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "serve")) {
        printf("hello from %s\n", getenv("NAME"));
        fprintf(stderr, "a line on stderr\n");
        greeting();
        printf("write to ro mount: %s\n", try_open(3, "new", O_WRONLY | O_CREAT));
        printf("write to rw mount: %s\n", try_open(4, "out.txt", O_WRONLY | O_CREAT));
        printf("read /etc/passwd: %s\n", try_open(AT_FDCWD, "/etc/passwd", O_RDONLY));
        for (volatile long i = 0; i < 50000000; i++) {}  /* CPU time for the stats */
        signal(SIGTERM, SIG_IGN);  /* only SIGKILL at the stop timeout ends it */
        for (unsigned long i = 0;; i++) { printf("tick %lu\n", i); nap(100); }
    }
    if (!strcmp(mode, "exec")) {
        greeting();
        printf("exec read /etc/passwd: %s\n", try_open(AT_FDCWD, "/etc/passwd", O_RDONLY));
        fprintf(stderr, "exec stderr\n");
        return 4;
    }
    if (!strcmp(mode, "spam")) {  /* argv[2] bytes of 'x' on stdout */
        static char block[65536];
        memset(block, 'x', sizeof block);
        for (long left = atol(argv[2]); left > 0; left -= sizeof block)
            if (write(1, block, left < (long)sizeof block ? left : (long)sizeof block) < 0) return 1;
        return 0;
    }
    if (!strcmp(mode, "greet")) printf("I am %s\n", getenv("WHO"));
    if (!strcmp(mode, "hang") || !strcmp(mode, "greet")) for (;;) nap(1000);
    if (!strcmp(mode, "exit")) {
        printf("synthesized: GREETING=%s\n", getenv("GREETING"));
        return atoi(argv[2]);
    }
    return 99;
}
"""

ECHO_SERVER_PY = """\
#!/usr/bin/python3 -I
# A switchboard echo server: its handle is the fd named "api" (a !server).
import os, sys
sys.path.insert(0, os.environ["CAPVISOR_LIB"])
from supervisor.switchboard_client import Handle

listener = Handle.from_listen_fds("api").server_start({})
print("serving", flush=True)
while True:
    incoming = listener.receive()
    listener.answer(incoming)
    with incoming.socket as conn:
        line = conn.recv(1024)
        conn.sendall(b"echo: " + line)
    print("answered", sorted(incoming.labels.items()), flush=True)
"""


class CriServer:
    """`capvisor cri serve` as a subprocess, with stubs of a client on its socket."""

    def __init__(self, user: User, work: Path, *args: str) -> None:
        self.work = work
        self.root = work / "root"
        self.socket = work / "cri.sock"
        self.log = work / "server.log"
        self.root.mkdir(exist_ok=True)  # an existing one: a restarted server
        user.own(self.root)
        user.own(work)
        argv = [
            *user.prefix(),
            PYTHON,
            "-m",
            "supervisor",
            "cri",
            "serve",
            "--listen",
            f"unix://{self.socket}",
            "--root",
            str(self.root),
            *args,
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, cwd=work, stderr=log, stdout=log)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(f"unix://{self.socket}", options=options)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("the server did not stop at SIGTERM") from None
        assert self.process.returncode == 0, self.log.read_text()
        assert not self.socket.exists()


@pytest.fixture
def server(as_user: User, work: Path) -> Iterator[CriServer]:
    srv = CriServer(as_user, work)
    try:
        yield srv
    finally:
        srv.stop()
    assert "internal error" not in srv.log.read_text()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    """The status code ``call`` fails with (OK if it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def details_of(call, *args) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return f"{err.value.code().name}: {err.value.details()}"


def pod_config(name: str, log_directory: Path, **fields: object) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"),
        log_directory=str(log_directory),
        **fields,  # type: ignore[arg-type]
    )


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


WEB = """\
# The web container: the C program in serve mode.
args: [serve]
env: {NAME: web}
fds:
  data: !mount /data
  out: !mount /out
"""


def test_kubelet_sequence(server: CriServer, as_user: User, work: Path, cc) -> None:
    rt, im = server.runtime, server.images
    binary = cc("cri_prog", PROGRAM_C)
    data, out, logs = work / "data", work / "out", work / "logs"
    for d in (data, out, logs):
        d.mkdir()
        as_user.own(d)
    (data / "greeting.txt").write_text("hello from the data mount\n")

    # version, status
    version = rt.Version(cri.VersionRequest(version="v1"))
    assert (version.runtime_name, version.runtime_api_version) == ("capvisor", "v1")
    conditions = {c.type: c.status for c in rt.Status(cri.StatusRequest()).status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}

    # pull (twice: same id), image status, fs info
    digest = "sha256:" + hashlib.sha256(binary.read_bytes()).hexdigest()
    for _ in range(2):
        pulled = im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=f"file://{binary}")))
        assert pulled.image_ref == digest
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="/bin/sh")))
    image = im.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=f"file://{binary}")))
    assert image.image.id == digest
    assert im.ImageFsInfo(cri.ImageFsInfoRequest()).image_filesystems[0].inodes_used.value == 2

    # runp (twice: same id); a second pod to tell filters apart
    labels = {"app": "web", "tier": "front"}
    annotations = {"capvisor.dev/program.web": WEB, "note": "kept as is"}
    config = pod_config("web-pod", logs, labels=labels, annotations=annotations)
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    assert rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id == pod
    other = rt.RunPodSandbox(
        cri.RunPodSandboxRequest(config=pod_config("other", logs, labels={"app": "other"}))
    ).pod_sandbox_id
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert (status.state, status.metadata.name, status.metadata.namespace) == (
        cri.SANDBOX_READY,
        "web-pod",
        "default",
    )
    assert dict(status.labels) == labels and dict(status.annotations) == annotations
    assert status.created_at > 0

    # create (twice: same id): web from the annotation, job synthesized
    mounts = [
        cri.Mount(container_path="/data", host_path=str(data), readonly=True),
        cri.Mount(container_path="/out", host_path=str(out)),
    ]
    web_config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="web"),
        image=cri.ImageSpec(image=f"file://{binary}"),
        labels={"role": "server"},
        annotations={"a": "1"},
        mounts=mounts,
        log_path="web_0.log",
    )
    create = cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=web_config, sandbox_config=config
    )
    web = rt.CreateContainer(create).container_id
    assert rt.CreateContainer(create).container_id == web
    # job: synthesized, confined by a Localhost profile in OCI/Docker JSON (imported).
    profile = work / "profile.json"
    default_policy = policy.load_policy(str(policy.find_policy("default")))
    profile.write_text(json.dumps(export_oci(default_policy)))
    job_config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="job"),
        image=cri.ImageSpec(image=digest),
        command=["prog"],
        args=["exit", "3"],
        envs=[cri.KeyValue(key="GREETING", value="hi there")],
        working_dir="/out",
        labels={"role": "batch"},
        mounts=mounts,
        log_path="job_0.log",
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                seccomp=cri.SecurityProfile(
                    profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(profile)
                )
            )
        ),
    )
    job = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod, config=job_config, sandbox_config=config)
    ).container_id
    created = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=web)).status
    assert created.state == cri.CONTAINER_CREATED and created.started_at == 0

    # start (web twice: starting a running container does nothing)
    rt.StartContainer(cri.StartContainerRequest(container_id=web))
    rt.StartContainer(cri.StartContainerRequest(container_id=web))
    rt.StartContainer(cri.StartContainerRequest(container_id=job))
    web_log = logs / "web_0.log"
    wait_for(lambda: web_log.exists() and b"tick 2\n" in web_log.read_bytes())

    def job_exited() -> bool:
        state = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=job)).status.state
        return state == cri.CONTAINER_EXITED

    wait_for(job_exited)
    assert "has exited" in details_of(
        rt.StartContainer, cri.StartContainerRequest(container_id=job)
    )

    # list with each filter
    def listed(**fields: object) -> set[str]:
        request = cri.ListContainersRequest(filter=cri.ContainerFilter(**fields))  # type: ignore[arg-type]
        return {c.id for c in rt.ListContainers(request).containers}

    assert listed() == {web, job}
    assert listed(id=web) == {web} and listed(id=web[:6]) == {web}
    assert listed(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING)) == {web}
    assert listed(state=cri.ContainerStateValue(state=cri.CONTAINER_EXITED)) == {job}
    assert listed(pod_sandbox_id=pod) == {web, job} and listed(pod_sandbox_id=other) == set()
    assert listed(label_selector={"role": "batch"}) == {job}
    assert listed(label_selector={"role": "batch", "x": "y"}) == set()
    (item,) = rt.ListContainers(
        cri.ListContainersRequest(filter=cri.ContainerFilter(id=web))
    ).containers
    assert (item.pod_sandbox_id, item.image_ref, item.metadata.name) == (pod, digest, "web")

    def pods(**fields: object) -> set[str]:
        request = cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(**fields))  # type: ignore[arg-type]
        return {p.id for p in rt.ListPodSandbox(request).items}

    assert pods() == {pod, other} and pods(id=pod) == {pod}
    assert pods(label_selector={"app": "other"}) == {other}
    assert pods(state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY)) == {pod, other}

    # inspect: every status field
    s = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=job)).status
    assert (s.state, s.exit_code, s.reason) == (cri.CONTAINER_EXITED, 3, "Error")
    assert 0 < s.created_at <= s.started_at <= s.finished_at
    assert s.log_path == str(logs / "job_0.log")
    assert (s.image.image, s.image_ref) == (digest, digest)
    assert dict(s.labels) == {"role": "batch"}
    assert [(m.container_path, m.readonly) for m in s.mounts] == [("/data", True), ("/out", False)]
    s = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=web, verbose=True))
    assert s.status.state == cri.CONTAINER_RUNNING and s.status.started_at > 0
    assert dict(s.status.annotations) == {"a": "1"} and "info" in s.info

    # read the log files (CRI format): what the confined programs did
    text = web_log.read_text()
    lines = text.splitlines()
    assert all(line[:4].isdigit() and line[10] == "T" and line[29] == "Z" for line in lines)
    assert " stdout F hello from web" in text
    assert " stderr F a line on stderr" in text
    assert " stdout F greeting: hello from the data mount" in text
    assert " stdout F write to ro mount: Permission denied" in text
    assert " stdout F write to rw mount: ALLOWED" in text
    assert " stdout F read /etc/passwd: Permission denied" in text
    assert (out / "out.txt").exists() and not (data / "new").exists()
    assert " stdout F synthesized: GREETING=hi there" in (logs / "job_0.log").read_text()
    (imported,) = (server.root / "policies").iterdir()
    assert (
        imported.name.startswith("profile-")
        and "Imported from profile.json" in imported.read_text()
    )

    # exec-sync: confined like the container (same fds), output, exit code, cap, timeout
    r = rt.ExecSync(cri.ExecSyncRequest(container_id=web, cmd=[str(binary), "exec"], timeout=10))
    assert r.exit_code == 4
    assert b"greeting: hello from the data mount" in r.stdout
    assert b"exec read /etc/passwd: Permission denied" in r.stdout
    assert r.stderr == b"exec stderr\n"
    big = rt.ExecSync(
        cri.ExecSyncRequest(container_id=web, cmd=[str(binary), "spam", str(17 << 20)], timeout=30)
    )
    assert big.exit_code == 0 and len(big.stdout) == 16 << 20
    started = time.monotonic()
    code = code_of(
        rt.ExecSync, cri.ExecSyncRequest(container_id=web, cmd=[str(binary), "hang"], timeout=1)
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert code_of(rt.ExecSync, cri.ExecSyncRequest(container_id=job, cmd=["/bin/true"])) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )

    # stats
    st = rt.ContainerStats(cri.ContainerStatsRequest(container_id=web)).stats
    assert st.attributes.id == web and st.cpu.usage_core_nano_seconds.value > 0
    assert st.memory.working_set_bytes.value > 0 and st.cpu.timestamp > 0
    all_stats = rt.ListContainerStats(cri.ListContainerStatsRequest()).stats
    assert {x.attributes.id for x in all_stats} == {web, job}
    by_label = rt.ListContainerStats(
        cri.ListContainerStatsRequest(
            filter=cri.ContainerStatsFilter(label_selector={"role": "server"})
        )
    ).stats
    assert [x.attributes.id for x in by_label] == [web]

    # log rotation as kubelet does it: rename, ReopenContainerLog, a new file at the path
    rotated = logs / "web_0.log.20261123-000000"
    web_log.rename(rotated)
    rt.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=web))
    wait_for(lambda: web_log.exists() and b"tick" in web_log.read_bytes())
    old_size = rotated.stat().st_size
    time.sleep(0.3)
    assert rotated.stat().st_size == old_size, "nothing more goes to the renamed file"
    last_old = int(rotated.read_text().splitlines()[-1].rsplit(" ", 1)[1])
    first_new = int(web_log.read_text().splitlines()[0].rsplit(" ", 1)[1])
    assert first_new == last_old + 1, "no tick lost or doubled across the reopen"
    assert code_of(rt.ReopenContainerLog, cri.ReopenContainerLogRequest(container_id=job)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )

    # stop with a timeout: web ignores SIGTERM and is killed at the timeout, while
    # other RPCs are answered at once (the gRPC threads wait, trio does not)
    stop_took: list[float] = []

    def stop() -> None:
        t0 = time.monotonic()
        rt.StopContainer(cri.StopContainerRequest(container_id=web, timeout=2))
        stop_took.append(time.monotonic() - t0)

    stopper = threading.Thread(target=stop)
    stopper.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    for _ in range(5):
        rt.Version(cri.VersionRequest())
        rt.ListContainers(cri.ListContainersRequest())
    assert time.monotonic() - t0 < 1.0, "RPCs wait for a stop in progress"
    stopper.join(10)
    assert 1.9 <= stop_took[0] < 5
    s = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=web)).status
    assert (s.state, s.exit_code) == (cri.CONTAINER_EXITED, 128 + signal.SIGKILL)
    assert s.finished_at >= s.started_at
    t0 = time.monotonic()
    rt.StopContainer(cri.StopContainerRequest(container_id=web, timeout=2))  # again: done at once
    assert time.monotonic() - t0 < 1

    # rm (twice), stopp (twice), rmp (twice)
    for _ in range(2):
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=web))
    assert listed() == {job}
    assert code_of(rt.ContainerStatus, cri.ContainerStatusRequest(container_id=web)) == (
        grpc.StatusCode.NOT_FOUND
    )
    for _ in range(2):
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    assert pods(state=cri.PodSandboxStateValue(state=cri.SANDBOX_NOTREADY)) == {pod}
    for _ in range(2):
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert listed() == set() and pods() == {other}
    assert code_of(rt.PodSandboxStatus, cri.PodSandboxStatusRequest(pod_sandbox_id=pod)) == (
        grpc.StatusCode.NOT_FOUND
    )
    # The log files stay for the kubelet to clean up.
    assert web_log.exists() and (logs / "job_0.log").exists()


def test_unknown_ids_bad_requests_and_unimplemented(server: CriServer, work: Path, cc) -> None:
    rt, im = server.runtime, server.images
    binary = cc("cri_prog", PROGRAM_C)
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=str(binary))))
    NOT_FOUND, OK = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK
    # Status of anything unknown is NotFound; stop and remove of it succeed.
    assert code_of(rt.ContainerStatus, cri.ContainerStatusRequest(container_id="nope")) == NOT_FOUND
    assert (
        code_of(rt.PodSandboxStatus, cri.PodSandboxStatusRequest(pod_sandbox_id="nope"))
        == NOT_FOUND
    )
    assert code_of(rt.StartContainer, cri.StartContainerRequest(container_id="nope")) == NOT_FOUND
    assert code_of(rt.ContainerStats, cri.ContainerStatsRequest(container_id="nope")) == NOT_FOUND
    assert (
        code_of(rt.ExecSync, cri.ExecSyncRequest(container_id="nope", cmd=["/bin/true"]))
        == NOT_FOUND
    )
    assert (
        code_of(rt.ReopenContainerLog, cri.ReopenContainerLogRequest(container_id="nope"))
        == NOT_FOUND
    )
    for _ in range(2):
        assert code_of(rt.StopContainer, cri.StopContainerRequest(container_id="nope")) == OK
        assert code_of(rt.RemoveContainer, cri.RemoveContainerRequest(container_id="nope")) == OK
        assert code_of(rt.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id="nope")) == OK
        assert (
            code_of(rt.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id="nope")) == OK
        )
    assert "must not be empty" in details_of(rt.ContainerStatus, cri.ContainerStatusRequest())
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="bad"), image=cri.ImageSpec(image=str(binary))
    )
    missing_pod = cri.CreateContainerRequest(pod_sandbox_id="nope", config=container)
    assert code_of(rt.CreateContainer, missing_pod) == NOT_FOUND

    # A bad description fails CreateContainer with InvalidArgument naming line and column.
    bad = "args: [serve]\nlimitz: {nofile: 3}\n"
    config = pod_config("p", work, annotations={"capvisor.dev/program.bad": bad})
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    request = cri.CreateContainerRequest(pod_sandbox_id=pod, config=container)
    assert details_of(rt.CreateContainer, request) == (
        "INVALID_ARGUMENT: pod annotation capvisor.dev/program.bad:2:1: "
        "unknown key 'limitz' in description (did you mean limits?)"
    )
    unpulled = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="x"), image=cri.ImageSpec(image="/bin/ls")
    )
    assert "is not pulled" in details_of(
        rt.CreateContainer, cri.CreateContainerRequest(pod_sandbox_id=pod, config=unpulled)
    )
    # Unconfined is refused (this server was started without --allow-unconfined).
    unconfined = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="u"),
        image=cri.ImageSpec(image=str(binary)),
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
            )
        ),
    )
    assert "Unconfined is refused" in details_of(
        rt.CreateContainer, cri.CreateContainerRequest(pod_sandbox_id=pod, config=unconfined)
    )
    # A Localhost profile that does not compile: InvalidArgument naming its line.
    broken = work / "broken.yaml"
    broken.write_text("version: 1\nallow: [no_such_syscall]\n")
    localhost = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="l"),
        image=cri.ImageSpec(image=str(binary)),
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                seccomp=cri.SecurityProfile(
                    profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(broken)
                )
            )
        ),
    )
    message = details_of(
        rt.CreateContainer, cri.CreateContainerRequest(pod_sandbox_id=pod, config=localhost)
    )
    assert message.startswith(f"INVALID_ARGUMENT: {broken}:2:") and "no_such_syscall" in message
    # Every RPC capvisor does not implement says so, by name.
    assert "runtime.v1.RuntimeService/Attach is not implemented" in details_of(
        rt.Attach, cri.AttachRequest(container_id="x")
    )
    assert "UpdateContainerResources" in details_of(
        rt.UpdateContainerResources, cri.UpdateContainerResourcesRequest(container_id="x")
    )
    # The server survived all of it.
    assert rt.Version(cri.VersionRequest()).runtime_name == "capvisor"


SERVER_POD = """\
env: {{CAPVISOR_LIB: {lib}}}
fds:
  api: !server {{service: echo}}
  lib: !mount /lib
"""

CLIENT_POD = """\
args: [-c, 'echo ping >&3; read reply <&3; echo "reply: $reply"']
fds:
  api: !connect {{service: echo, program: default/echo-pod/echo}}
"""


def test_two_pods_talk_through_the_switchboard(
    server: CriServer, as_user: User, work: Path
) -> None:
    """`!server` in one pod, `!connect` in another, matched by labels; no network of their own."""
    rt, im = server.runtime, server.images
    logs = work / "logs"
    logs.mkdir()
    as_user.own(logs)
    script = work / "echo_server.py"
    script.write_text(ECHO_SERVER_PY)
    script.chmod(0o755)
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=str(script))))
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="/bin/sh")))
    lib = cri.Mount(container_path="/lib", host_path=str(REPO), readonly=True)

    def run_pod(name: str, container: str, image: str, program: str, mounts=()) -> tuple[str, str]:
        config = pod_config(name, logs, annotations={f"capvisor.dev/program.{container}": program})
        pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod,
                sandbox_config=config,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name=container),
                    image=cri.ImageSpec(image=image),
                    mounts=list(mounts),
                    log_path=f"{name}.log",
                ),
            )
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        return pod, cid

    server_program = SERVER_POD.format(lib=str(REPO))
    run_pod("echo-pod", "echo", str(script), server_program, [lib])
    wait_for(
        lambda: (
            (logs / "echo-pod.log").exists() and b"serving" in (logs / "echo-pod.log").read_bytes()
        )
    )
    _, client = run_pod("client-pod", "client", "/bin/sh", CLIENT_POD.format())

    def client_exited() -> bool:
        status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=client)).status
        return status.state == cri.CONTAINER_EXITED

    wait_for(client_exited)
    status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=client)).status
    client_log = (logs / "client-pod.log").read_text()
    assert status.exit_code == 0, client_log + (logs / "echo-pod.log").read_text()
    assert " stdout F reply: echo: ping" in client_log
    # The server's handle carried the pod identity (namespace/pod/container), unforgeable.
    server_log = (logs / "echo-pod.log").read_text()
    assert "('program', 'default/echo-pod/echo')" in server_log
    assert "('namespace', 'default')" in server_log and "('pod', 'echo-pod')" in server_log
    assert "('container', 'echo')" in server_log
    assert "('service', 'echo')" in server_log


def test_concurrent_lifecycles(server: CriServer, as_user: User, work: Path, cc) -> None:
    """Eight client threads run pod lifecycles at once; each gets its own answers."""
    rt, im = server.runtime, server.images
    logs = work / "logs"
    logs.mkdir()
    as_user.own(logs)
    binary = cc("cri_prog", PROGRAM_C)
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=str(binary))))
    program = "args: [greet]\nenv: {WHO: %s}\n"

    def lifecycle(n: int) -> str:
        name = f"pod{n}"
        config = pod_config(name, logs, annotations={"capvisor.dev/program.c": program % name})
        pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"),
            image=cri.ImageSpec(image=str(binary)),
            log_path=f"{name}.log",
        )
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        log = logs / f"{name}.log"
        wait_for(lambda: log.exists() and b"I am" in log.read_bytes())
        status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        assert status.state == cri.CONTAINER_RUNNING
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1))
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        return (logs / f"{name}.log").read_text()

    with ThreadPoolExecutor(8) as pool:
        logs_read = list(pool.map(lifecycle, range(16)))
    for n, text in enumerate(logs_read):
        assert f" stdout F I am pod{n}\n" in text
    assert rt.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert rt.ListContainers(cri.ListContainersRequest()).containers == []


def _running(argv: list[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if [a.decode(errors="replace") for a in cmdline] == argv:
            found.append(int(entry.name))
    return found


def test_exec_sync_is_killed_when_its_client_goes_away(
    server: CriServer, as_user: User, work: Path, cc
) -> None:
    rt, im = server.runtime, server.images
    binary = cc("cri_prog", PROGRAM_C)
    im.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=str(binary))))
    logs = work / "logs"
    logs.mkdir()
    as_user.own(logs)
    config = pod_config("p", logs, annotations={"capvisor.dev/program.c": "args: [hang]\n"})
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=str(binary))
    )
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    argv = [str(binary), "hang", "exec"]
    request = cri.ExecSyncRequest(container_id=cid, cmd=argv, timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        rt.ExecSync(request, timeout=1.5)  # the client's deadline, not the exec's timeout
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: not _running(argv), timeout=10)
    assert rt.Version(cri.VersionRequest()).runtime_name == "capvisor"


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("tcp://127.0.0.1:1", "--listen tcp://127.0.0.1:1: expected unix:///absolute/path"),
        ("unix:///proc/nonexistent/cri.sock", "No such file or directory"),
    ],
)
def test_serve_refuses_a_bad_listen_address(work: Path, listen: str, message: str) -> None:
    argv = [PYTHON, "-m", "supervisor", "cri", "serve", "--listen", listen]
    result = subprocess.run([*argv, "--root", str(work / "r")], capture_output=True, timeout=60)
    assert result.returncode == 125
    assert message in result.stderr.decode()
    assert "internal error" not in result.stderr.decode()


def test_serve_refuses_a_socket_in_use(server: CriServer, work: Path) -> None:
    argv = [PYTHON, "-m", "supervisor", "cri", "serve", "--listen", f"unix://{server.socket}"]
    result = subprocess.run([*argv, "--root", str(work / "other")], capture_output=True, timeout=60)
    assert result.returncode == 125
    assert "another server is listening there" in result.stderr.decode()
    assert server.runtime.Version(cri.VersionRequest()).runtime_name == "capvisor"


def test_a_restarted_server_knows_its_pods_containers_and_images(
    as_user: User, work: Path, cc
) -> None:
    binary = cc("cri_prog", PROGRAM_C)
    logs = work / "logs"
    logs.mkdir()
    as_user.own(logs)
    first = CriServer(as_user, work)
    try:
        rt = first.runtime
        first.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=str(binary))))
        config = pod_config("p", logs, annotations={"capvisor.dev/program.c": "args: [hang]\n"})
        pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"),
            image=cri.ImageSpec(image=str(binary)),
            labels={"k": "v"},
            log_path="c.log",
        )
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    finally:
        first.stop()  # SIGTERM: the running container is stopped
    second = CriServer(as_user, work)
    try:
        rt = second.runtime
        (pod_item,) = rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
        assert pod_item.id == pod and pod_item.metadata.name == "p"
        s = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
        assert s.state == cri.CONTAINER_EXITED and s.finished_at > 0
        assert s.image.image == str(binary) and s.image_ref.startswith("sha256:")
        assert dict(s.labels) == {"k": "v"}
        image = second.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=str(binary)))
        )
        assert image.image.id == s.image_ref
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    finally:
        second.stop()
