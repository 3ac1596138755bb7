"""The embeddable backend (supervisor/service.py) with real processes.

Each test opens a service on a fresh state directory, creates containers
from small shell descriptions and watches real children: their exit
results, restarts, whole-tree stops, the log file, idempotency.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from supervisor import cgroup, proctree
from supervisor.errors import CapvisorError, DescriptionError
from supervisor.service import (
    AlreadyExistsError,
    ContainerConfig,
    NotFoundError,
    PodConfig,
    PodState,
    Service,
    State,
    open_service,
)
from supervisor.state import StateError

SH = "/bin/sh"


def description(script: str, **extra: str) -> str:
    """A description running ``sh -c script``; the script may run what is in /usr/bin."""
    lines = [
        f"program: {SH}",
        f"args: [-c, {json.dumps(script)}]",
        "runtime: [/usr/bin]",
        "degrade: allow",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def config(tmp_path: Path, name: str, script: str, **extra: str) -> ContainerConfig:
    path = tmp_path / f"{name}.yaml"
    text = description(script, **extra)
    path.write_text(text)
    return ContainerConfig(name=name, description_text=text, description_file=str(path))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with open_service(tmp_path / "state") as svc:
        yield svc


async def pod(svc: Service, tmp_path: Path, name: str = "p") -> str:
    return await svc.create_pod(PodConfig(name=name, log_directory=str(tmp_path / "logs")))


def alive(pid: int) -> bool:
    info = proctree.stat(pid)
    return info is not None and info.state != "Z"


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_run_to_completion_logs_and_exit_result(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(pod_id, config(tmp_path, "hello", "echo hi; exit 3"))
    status = service.container_status(cid)
    assert status.state is State.CREATED and status.created_ns > 0
    await service.start_container(cid)
    status = await service.wait_container(cid)
    assert status.state is State.EXITED
    assert status.exit_code == 3 and status.reason == "Error"
    assert status.message == "exited with code 3"
    assert 0 < status.started_ns <= status.finished_ns
    log = Path(status.log_path).read_text()
    assert log.endswith(" stdout F hi\n"), log
    assert status.log_path == str(tmp_path / "logs" / "hello.log")


async def test_completed_reason_and_report(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(pod_id, config(tmp_path, "ok", "true"))
    await service.start_container(cid)
    status = await service.wait_container(cid)
    assert (status.exit_code, status.reason) == (0, "Completed")
    full = service.container_status(cid)
    assert full.report["seccomp"]["policy"] == "default"  # type: ignore[index]
    assert "cgroup" in full.report
    assert full.confinement.startswith("landlock:")


async def test_create_is_idempotent_and_conflicts_are_refused(
    service: Service, tmp_path: Path
) -> None:
    pod_id = await pod(service, tmp_path)
    assert await pod(service, tmp_path) == pod_id
    with pytest.raises(AlreadyExistsError):
        await service.create_pod(PodConfig(name="p", labels={"other": "x"}))
    cfg = config(tmp_path, "a", "sleep 30")
    cid = await service.create_container(pod_id, cfg)
    assert await service.create_container(pod_id, cfg) == cid
    with pytest.raises(AlreadyExistsError):
        await service.create_container(pod_id, config(tmp_path, "a", "sleep 31"))
    await service.start_container(cid)
    await service.start_container(cid)  # running: nothing happens
    pid = service.container_status(cid).pid
    assert pid is not None and alive(pid)
    await service.stop_container(cid, timeout=5)
    await service.stop_container(cid, timeout=5)  # stopped: nothing happens
    await service.stop_container("no-such-id")
    status = service.container_status(cid)
    assert status.state is State.EXITED and status.reason == "Killed"
    assert status.signal == signal.SIGTERM and status.exit_code == 128 + signal.SIGTERM
    assert not alive(pid)
    await service.remove_container(cid)
    await service.remove_container(cid)
    with pytest.raises(NotFoundError):
        service.container_status(cid)
    await service.remove_pod(pod_id)
    await service.remove_pod(pod_id)
    with pytest.raises(NotFoundError):
        service.pod_status(pod_id)


async def test_bad_description_names_file_line_column(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    bad = ContainerConfig(
        name="bad", description_text="program: /bin/true\nlimits: {nofile: many}\n",
        description_file=str(tmp_path / "bad.yaml"),
    )  # fmt: skip
    with pytest.raises(DescriptionError, match=r"bad\.yaml:2:18: limits\.nofile"):
        await service.create_container(pod_id, bad)
    assert service.list_containers() == []


async def test_filters(service: Service, tmp_path: Path) -> None:
    a = await service.create_pod(PodConfig(name="a", labels={"app": "x"}, log_directory="/tmp"))
    b = await service.create_pod(PodConfig(name="b", labels={"app": "y"}, log_directory="/tmp"))
    assert [p.id for p in service.list_pods(labels={"app": "y"})] == [b]
    cfg = config(tmp_path, "c1", "sleep 30")
    c1 = await service.create_container(
        a, ContainerConfig(**{**cfg.__dict__, "labels": {"tier": "web"}, "log_path": str(tmp_path / "c1.log")})
    )  # fmt: skip
    c2 = await service.create_container(
        b, ContainerConfig(**{**cfg.__dict__, "name": "c2", "log_path": str(tmp_path / "c2.log")})
    )  # fmt: skip
    await service.start_container(c1)
    assert [c.id for c in service.list_containers(state=State.RUNNING)] == [c1]
    assert [c.id for c in service.list_containers(state=State.CREATED)] == [c2]
    assert [c.id for c in service.list_containers(labels={"tier": "web"})] == [c1]
    assert [c.id for c in service.list_containers(pod_id=b)] == [c2]
    await service.stop_pod(a)
    assert service.pod_status(a).state is PodState.NOTREADY
    assert [p.id for p in service.list_pods(state=PodState.READY)] == [b]
    assert service.container_status(c1).state is State.EXITED


async def test_restart_on_failure_with_backoff_then_crash_loop(
    service: Service, tmp_path: Path
) -> None:
    pod_id = await pod(service, tmp_path)
    restart = "{policy: on-failure, backoff: 50ms..200ms, limit: 3, stable: 5s}"
    cid = await service.create_container(
        pod_id, config(tmp_path, "crash", "echo run; exit 7", restart=restart)
    )
    began = time.monotonic()
    await service.start_container(cid)
    status = await service.wait_container(cid)
    took = time.monotonic() - began
    assert status.failed and status.phase == "failed" and status.reason == "CrashLoop"
    assert status.restarts == 3
    assert "crash loop: restarted 3 times in a row" in status.message
    assert "exited with code 7" in status.message
    # Backoff 50ms, 100ms, 200ms, each with jitter in [0.5, 1]: at least 175 ms.
    assert took >= 0.175
    assert Path(status.log_path).read_text().count("stdout F run\n") == 4


async def test_restart_always_restarts_a_clean_exit_and_manual_start_clears_failed(
    service: Service, tmp_path: Path
) -> None:
    pod_id = await pod(service, tmp_path)
    restart = "{policy: always, backoff: 10ms..10ms, limit: 2}"
    cid = await service.create_container(pod_id, config(tmp_path, "loop", "true", restart=restart))
    await service.start_container(cid)
    status = await service.wait_container(cid)
    assert status.failed and status.restarts == 2 and status.exit_code == 0
    await service.start_container(cid)
    status = await service.wait_container(cid)
    assert status.failed and status.restarts == 4


async def test_on_failure_does_not_restart_success(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(
        pod_id, config(tmp_path, "once", "true", restart="{policy: on-failure, backoff: 10ms}")
    )
    await service.start_container(cid)
    status = await service.wait_container(cid)
    assert (status.restarts, status.failed, status.reason) == (0, False, "Completed")


async def test_stop_cancels_pending_restart(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(
        pod_id, config(tmp_path, "slow", "exit 1", restart="{policy: always, backoff: 30s}")
    )
    await service.start_container(cid)
    await wait_for(lambda: service.container_status(cid).phase == "backoff")
    assert service.container_status(cid).next_restart_ns > time.time_ns()
    with trio.fail_after(5):
        await service.stop_container(cid)
    status = service.container_status(cid)
    assert status.phase == "exited" and status.restarts == 0


async def test_start_failure_is_reported(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(
        pod_id,
        config(tmp_path, "nofile", "true", fds="{x: !file {path: /nonexistent/file}}"),
    )
    with pytest.raises(Exception, match="nonexistent"):
        await service.start_container(cid)
    status = service.container_status(cid)
    assert status.state is State.EXITED and status.reason == "ContainerCannotRun"
    assert "nonexistent" in status.message


async def test_stop_signal_then_kill_after_timeout(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    cid = await service.create_container(
        pod_id,
        config(tmp_path, "stubborn", "trap '' TERM; echo ready; while :; do sleep 1; done"),
    )
    await service.start_container(cid)
    log = Path(service.container_status(cid).log_path)
    await wait_for(lambda: log.exists() and "ready" in log.read_text())
    began = time.monotonic()
    await service.stop_container(cid, timeout=0.5)
    assert 0.4 <= time.monotonic() - began < 5
    status = service.container_status(cid)
    assert status.signal == signal.SIGKILL and status.reason == "Killed"


async def test_exec_sync_is_confined_like_the_container(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("nope")
    cid = await service.create_container(pod_id, config(tmp_path, "box", "sleep 30"))
    await service.start_container(cid)
    result = await service.exec_sync(cid, [SH, "-c", f"echo out; cat {secret}; exit 4"])
    assert result.exit_code == 4 and result.stdout == b"out\n"
    assert b"Permission denied" in result.stderr
    result = await service.exec_sync(cid, ["/bin/sleep", "30"], timeout=0.2)
    assert result.timed_out and result.exit_code == 128 + signal.SIGKILL
    await service.stop_container(cid, timeout=1)


async def test_reopen_log(service: Service, tmp_path: Path) -> None:
    pod_id = await pod(service, tmp_path)
    script = "while read line; do echo $line; done"
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    cid = await service.create_container(
        pod_id, config(tmp_path, "r", script, stdin=f"!file {{path: {fifo}}}")
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.start_container, cid)
        writer = await trio.to_thread.run_sync(lambda: open(fifo, "w", buffering=1))  # noqa: SIM115
    log = Path(service.container_status(cid).log_path)
    writer.write("one\n")
    await wait_for(lambda: "one" in log.read_text())
    log.rename(log.with_suffix(".old"))
    service.reopen_log(cid)
    writer.write("two\n")
    await wait_for(lambda: log.exists() and "two" in log.read_text())
    assert "two" not in log.with_suffix(".old").read_text()
    writer.close()
    await service.wait_container(cid)


# --- whole-tree stop -------------------------------------------------------------

CGROUP_MODES = [pytest.param(True, id="cgroup"), pytest.param(False, id="no-cgroup")]


@pytest.fixture(scope="module")
def cgroups() -> cgroup.Support:
    """What cgroup v2 offers here (probed once; the probe's directory is removed)."""
    support = cgroup.probe("test-probe")
    if support.base is not None:
        with contextlib.suppress(OSError):
            support.base.rmdir()
    return support


@pytest.fixture
def needs_cgroup(cgroups: cgroup.Support) -> None:
    if cgroups.base is None:
        pytest.skip(f"cgroup v2 is not writable here: {cgroups.reason}")


@pytest.fixture
def needs_cgroup_limits(cgroups: cgroup.Support, needs_cgroup: None) -> None:
    if cgroups.missing:
        pytest.skip(
            "cgroup v2 limits cannot be applied here: " + "; ".join(cgroups.missing.values())
        )


def read_pid(path: Path) -> int:
    return int(path.read_text().split()[0])


@pytest.mark.parametrize("use_cgroup", CGROUP_MODES)
async def test_stop_kills_grandchild_that_ignores_term(
    tmp_path: Path, use_cgroup: bool, cgroups: cgroup.Support
) -> None:
    if use_cgroup and cgroups.base is None:
        pytest.skip(f"cgroup v2 is not writable here: {cgroups.reason}")
    out = tmp_path / "out"
    out.mkdir()
    script = f"sh -c 'trap \"\" TERM; echo $$ > {out}/gc.pid; exec sleep 1000' & wait"
    async with open_service(tmp_path / "state", cgroups=use_cgroup) as svc:
        pod_id = await pod(svc, tmp_path)
        cid = await svc.create_container(
            pod_id,
            config(tmp_path, "tree", script, fds=f"{{out: !mount {{path: {out}, mode: rw}}}}"),
        )
        await svc.start_container(cid)
        await wait_for(lambda: (out / "gc.pid").exists() and (out / "gc.pid").read_text())
        grandchild = read_pid(out / "gc.pid")
        assert alive(grandchild)
        began = time.monotonic()
        await svc.stop_container(cid, timeout=10)
        assert time.monotonic() - began < 5  # the parent obeyed TERM: no wait for the timeout
        assert not alive(grandchild)
        assert svc.container_status(cid).signal == signal.SIGTERM


DAEMON = (
    "(setsid sh -c 'trap \"\" TERM; echo $$ > {out}/daemon.pid; exec sleep 1000' &); "
    "exec sleep 1000"
)


async def start_daemon(svc: Service, tmp_path: Path, out: Path) -> tuple[str, int]:
    """Start the DAEMON program; its container id and the pid of the daemon it left behind."""
    pod_id = await pod(svc, tmp_path)
    cid = await svc.create_container(
        pod_id,
        config(
            tmp_path,
            "daemon",
            DAEMON.format(out=out),
            fds=f"{{out: !mount {{path: {out}, mode: rw}}}}",
        ),
    )
    await svc.start_container(cid)
    await wait_for(lambda: (out / "daemon.pid").exists() and (out / "daemon.pid").read_text())
    return cid, read_pid(out / "daemon.pid")


async def test_stop_kills_double_forked_daemon_through_the_cgroup(
    tmp_path: Path, needs_cgroup: None
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    async with open_service(tmp_path / "state") as svc:
        cid, daemon = await start_daemon(svc, tmp_path, out)
        info = proctree.stat(daemon)
        assert info is not None and info.sid == daemon  # escaped the program's session
        await wait_for(lambda: (proctree.stat(daemon) or info).ppid == os.getpid())  # adopted
        await svc.stop_container(cid, timeout=10)
        await wait_for(lambda: not alive(daemon), timeout=5)
        # reaped by the subreaper, not left a zombie
        await wait_for(lambda: proctree.stat(daemon) is None, timeout=5)


async def test_without_cgroup_an_escaped_daemon_is_reaped_and_killed_at_shutdown(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    async with open_service(tmp_path / "state", cgroups=False) as svc:
        cid, daemon = await start_daemon(svc, tmp_path, out)
        await wait_for(lambda: (proctree.stat(daemon) or proctree.stat(1)).ppid == os.getpid())
        await svc.stop_container(cid, timeout=10)
    # Leaving the service killed and reaped the stray it had adopted.
    assert proctree.stat(daemon) is None


FORKY = "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; wait; echo done"


async def test_cgroup_limits_are_enforced(tmp_path: Path, needs_cgroup_limits: None) -> None:
    async with open_service(tmp_path / "state") as svc:
        pod_id = await pod(svc, tmp_path)
        cid = await svc.create_container(
            pod_id, config(tmp_path, "forky", FORKY, limits="{pids: 4, memory: 64M}")
        )
        await svc.start_container(cid)
        status = await svc.wait_container(cid)
        group = svc.container_status(cid).report["cgroup"]
        assert group["limits"] == {"pids": 4, "memory": 64 << 20}  # type: ignore[index]
        log = Path(status.log_path).read_text()
        assert "Resource temporarily unavailable" in log or "fork" in log.lower()


async def test_cgroup_limits_that_cannot_apply_are_reported(
    tmp_path: Path, cgroups: cgroup.Support
) -> None:
    if cgroups.base is not None and not cgroups.missing:
        pytest.skip("every cgroup limit can be applied here (see test_cgroup_limits_are_enforced)")
    async with open_service(tmp_path / "state") as svc:
        pod_id = await pod(svc, tmp_path)
        cid = await svc.create_container(
            pod_id, config(tmp_path, "forky", "true", limits="{pids: 4, memory: 64M}")
        )
        await svc.start_container(cid)
        await svc.wait_container(cid)
        report = svc.container_status(cid).report
        summary = svc.container_status(cid).confinement
    # Not silently ignored: every limit that could not be applied is in the report.
    degraded = "\n".join(report["degraded"])  # type: ignore[arg-type]
    assert "limits.pids" in degraded and "limits.memory" in degraded
    assert "degraded:" in summary


async def test_cgroup_limits_that_cannot_apply_fail_closed(
    tmp_path: Path, cgroups: cgroup.Support
) -> None:
    if cgroups.base is not None and not cgroups.missing:
        pytest.skip("every cgroup limit can be applied here (see test_cgroup_limits_are_enforced)")
    text = f"program: {SH}\nargs: [-c, 'echo ran']\nlimits: {{pids: 4}}\n"
    path = tmp_path / "strict.yaml"
    path.write_text(text)
    async with open_service(tmp_path / "state") as svc:
        pod_id = await pod(svc, tmp_path)
        cid = await svc.create_container(
            pod_id,
            ContainerConfig(name="strict", description_text=text, description_file=str(path)),
        )
        with pytest.raises(
            CapvisorError, match=r"strict\.yaml:3:1: limits\.pids: .*set `degrade: allow`"
        ):
            await svc.start_container(cid)
        status = svc.container_status(cid)
    assert status.state is State.EXITED
    assert "ran" not in Path(status.log_path).read_text()


async def test_first_start_failure_is_retried_by_the_restart_policy(
    service: Service, tmp_path: Path
) -> None:
    pod_id = await pod(service, tmp_path)
    missing = tmp_path / "appears-later"
    cid = await service.create_container(
        pod_id,
        config(
            tmp_path,
            "late",
            "exec sleep 30",
            fds=f"{{x: !file {{path: {missing}}}}}",
            restart="{policy: on-failure, backoff: 50ms..100ms, limit: 100}",
        ),
    )
    with pytest.raises(Exception, match="appears-later"):
        await service.start_container(cid)
    assert service.container_status(cid).reason == "ContainerCannotRun"
    missing.write_text("here now")
    await wait_for(lambda: service.container_status(cid).state is State.RUNNING)
    assert service.container_status(cid).restarts >= 1
    await service.stop_container(cid, timeout=1)


async def test_state_directory_is_locked(tmp_path: Path) -> None:
    async with open_service(tmp_path / "state"):
        with pytest.raises(StateError, match="in use by another capvisor supervisor"):
            async with open_service(tmp_path / "state"):
                pass


async def test_state_survives_a_clean_restart(tmp_path: Path) -> None:
    async with open_service(tmp_path / "state") as svc:
        pod_id = await pod(svc, tmp_path)
        done = await svc.create_container(pod_id, config(tmp_path, "done", "exit 5"))
        await svc.start_container(done)
        await svc.wait_container(done)
        running = await svc.create_container(pod_id, config(tmp_path, "running", "exec sleep 30"))
        await svc.start_container(running)
        created = await svc.create_container(pod_id, config(tmp_path, "created", "true"))
        pid = svc.container_status(running).pid
    assert pid is not None and not alive(pid)  # leaving the service stopped it
    async with open_service(tmp_path / "state") as svc:
        assert [c.name for c in svc.list_containers()] == ["done", "running", "created"]
        assert svc.container_status(done).exit_code == 5
        assert svc.container_status(running).reason == "Killed"
        assert svc.container_status(created).state is State.CREATED
        assert svc.pod_status(pod_id).config.name == "p"
        await svc.start_container(created)  # the recorded description still runs
        assert (await svc.wait_container(created)).reason == "Completed"


async def test_program_runs_in_its_own_cgroup_from_the_start(
    tmp_path: Path, needs_cgroup: None
) -> None:
    async with open_service(tmp_path / "state") as svc:
        pod_id = await pod(svc, tmp_path)
        cid = await svc.create_container(pod_id, config(tmp_path, "cg", "exec sleep 30"))
        await svc.start_container(cid)
        status = svc.container_status(cid)
        assert status.cgroup is not None and status.pid is not None
        line = next(
            entry
            for entry in Path(f"/proc/{status.pid}/cgroup").read_text().splitlines()
            if entry.startswith("0::")
        )
        assert status.cgroup.endswith(line[3:])
        assert Path(status.cgroup, "cgroup.procs").read_text().split() == [str(status.pid)]
        assert svc.container_status(cid).report["cgroup"]["applied"] is True  # type: ignore[index]
        await svc.stop_container(cid, timeout=1)
    assert not Path(status.cgroup).exists()  # removed at shutdown


async def test_a_full_log_disk_is_reported_and_the_program_runs_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (tests/test_logs_file.py covers the sink)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "capvisor-test", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        async with open_service(tmp_path / "state") as svc:
            pod_id = await svc.create_pod(PodConfig(name="p", log_directory=str(disk)))
            script = "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; exit 3"
            cid = await svc.create_container(pod_id, config(tmp_path, "flood", script))
            await svc.start_container(cid)
            status = await svc.wait_container(cid)
        # The program ran to its own end; the supervisor said why its log stopped.
        assert status.exit_code == 3
        assert "capvisor: flood: writing the log to" in capfd.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
