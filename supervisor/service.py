"""The embeddable backend: pods and containers over :mod:`supervisor.process`.

One code path serves ``capvisor up`` and the CRI frontend (DESIGN §8). A
*pod* groups containers that share identity labels and a log directory; a
*container* is one supervised program, made from a checked description.
All calls are idempotent the way the CRI requires: stopping or removing
something already stopped or gone succeeds; creating what already exists
with the same identity returns the existing id.

Use it from any trio program::

    async with open_service(state_dir) as service:
        pod = await service.create_pod(PodConfig(name="web"))
        cid = await service.create_container(pod, ContainerConfig.from_file("app.yaml"))
        await service.start_container(cid)
        ...
        await service.stop_container(cid, timeout=5)

Leaving the ``async with`` stops every running container (its stop signal,
SIGKILL after its timeout, for the whole tree) and records why. The state
is kept in SQLite in ``state_dir`` (:mod:`supervisor.state`): after a
restart, also after a SIGKILL of the supervisor, every container is listed
with its last known state; a container that was running when the
supervisor died is killed (cgroup or recorded process group) and reported
``EXITED`` with reason ``SupervisorDied`` (docs/service.md).

Timestamps are nanoseconds since the epoch (``time.time_ns()``); 0 means
"not yet". Methods must be called from the trio thread that entered
``open_service`` (children get ``PR_SET_PDEATHSIG`` bound to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import cgroup, proctree, tags
from .description import Description, RestartPolicy, StopPolicy, parse_description
from .errors import EXIT_NOT_FOUND, CapvisorError, ConfinementError, ProblemsError
from .logfile import LogEvent, LogFile
from .process import DRAIN_GRACE, Child, ExitStatus, reap_adopted, run_plan
from .resolve import HostMount, LaunchPlan, SwitchboardAccess, resolve
from .restart import RestartTracker
from .state import StateStore
from .tags import Context

__all__ = [
    "AlreadyExistsError",
    "ContainerConfig",
    "ContainerStatus",
    "ExecResult",
    "HostMount",
    "NotFoundError",
    "Pod",
    "PodConfig",
    "PodState",
    "Service",
    "ServiceError",
    "State",
    "open_service",
]


class ServiceError(CapvisorError):
    """A request the backend cannot carry out (see the subclasses)."""


class NotFoundError(ServiceError):
    """No pod or container with this id (CRI: NotFound)."""


class AlreadyExistsError(ServiceError):
    """The name is taken by a pod or container with a different config (CRI: AlreadyExists)."""


class State(enum.Enum):
    """A container's state, as the CRI knows it."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class PodState(enum.Enum):
    """A pod's state: READY until it is stopped."""

    READY = "ready"
    NOTREADY = "notready"


#: Exit reasons (``ContainerStatus.reason``).
REASON_COMPLETED = "Completed"  # exit code 0
REASON_ERROR = "Error"  # non-zero exit code, or killed by a signal it did not ask for
REASON_KILLED = "Killed"  # stopped by request (stop signal / SIGKILL after the timeout)
REASON_OOM = "OOMKilled"  # the cgroup's memory.events counted an oom_kill
REASON_CANNOT_RUN = "ContainerCannotRun"  # resolve or spawn failed; message says why
REASON_CRASH_LOOP = "CrashLoop"  # restart policy gave up: state EXITED, failed=True
REASON_SUPERVISOR_DIED = "SupervisorDied"  # running when the supervisor died; killed at restart
REASON_INTERNAL = "InternalError"  # a bug in capvisor; message says what; not restarted


@dataclass(frozen=True)
class PodConfig:
    """What a pod is created from: its identity (CRI PodSandboxMetadata) and more.

    ``log_directory`` is where container log paths are relative to (None:
    container log paths must be absolute).
    """

    name: str
    namespace: str = ""
    uid: str = ""
    attempt: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    log_directory: str | None = None


@dataclass(frozen=True)
class Pod:
    """A pod as :meth:`Service.pod_status` and :meth:`Service.list_pods` return it."""

    id: str
    config: PodConfig
    state: PodState
    created_ns: int


@dataclass(frozen=True)
class ContainerConfig:
    """What a container is created from.

    ``description_text`` is the YAML program description (checked at
    :meth:`Service.create_container`; relative paths in it are relative to
    the directory of ``description_file``, which also names it in errors).
    ``mounts`` are the mounts a scalar ``!mount NAME`` may name (CRI mounts
    by container path). ``log_path`` is relative to the pod's log directory
    (or absolute); None: ``NAME.log`` there. ``restart`` overrides the
    description's restart policy (the CRI frontend passes
    ``RestartPolicy("no")``: the kubelet restarts, not us). ``identity`` are
    the labels every ``!server`` handle of the program carries and cannot
    override (empty: ``{program: NAME}``, the description's name); the CRI
    frontend passes the pod's namespace, pod and container names.
    """

    name: str
    description_text: str
    description_file: str
    attempt: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    mounts: Mapping[str, HostMount] = field(default_factory=dict)
    log_path: str | None = None
    restart: RestartPolicy | None = None
    identity: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: object) -> ContainerConfig:
        """A config whose description is the file ``path``; name defaults to its stem."""
        path = Path(path)
        kwargs.setdefault("name", path.stem)
        return cls(
            description_text=path.read_text(),
            description_file=str(path.resolve()),
            **kwargs,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ContainerStatus:
    """A container as :meth:`Service.container_status` and :meth:`Service.list_containers` see it.

    ``pid`` is set while RUNNING. ``exit_code`` is the shell-style code
    (128+N when killed by signal N) once EXITED; ``signal`` is N then.
    ``exit_code``, ``signal``, ``reason``, ``message`` and ``finished_ns``
    describe the last exit and stay set while the container runs again
    (a CRI frontend reports them only for EXITED).
    ``restarts`` counts restarts by the restart policy; ``failed`` is True
    once the policy gave up (reason ``CrashLoop``); ``next_restart_ns`` is
    set while waiting to restart. ``phase`` is the finer state ``ps`` shows:
    created, running, backoff, stopping, exited, failed, unknown.
    ``confinement`` is a one-line summary; ``report`` the full confinement
    report of the last start (empty before).
    """

    id: str
    pod_id: str
    name: str
    attempt: int
    state: State
    phase: str
    created_ns: int
    started_ns: int = 0
    finished_ns: int = 0
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    message: str = ""
    pid: int | None = None
    restarts: int = 0
    failed: bool = False
    next_restart_ns: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    log_path: str = ""
    description_file: str = ""
    cgroup: str | None = None
    confinement: str = ""
    report: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of :meth:`Service.exec_sync`: the exit code and the captured output."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class Service:
    """The backend; get one with :func:`open_service`. See the module docstring.

    Every method raises :class:`NotFoundError` for an unknown id except the
    idempotent ``stop_*``/``remove_*``, which succeed. Description problems
    raise :class:`~supervisor.errors.DescriptionError` (with FILE:LINE:COL);
    a capability that cannot be opened or a spawn that fails at start raises
    :class:`~supervisor.errors.CapvisorError` and leaves the container EXITED
    with reason ``ContainerCannotRun``.
    """

    def __init__(
        self,
        store: StateStore,
        nursery: trio.Nursery,
        *,
        switchboard: SwitchboardAccess | None,
        cgroups: cgroup.Support,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self._store = store
        self._nursery = nursery
        self._switchboard = switchboard
        self.cgroups = cgroups
        self._on_event = on_event
        self._pods: dict[str, _Pod] = {}
        self._containers: dict[str, _Container] = {}
        self._by_name: dict[tuple[str, str, int], _Container] = {}  # (pod, name, attempt)
        self._exec_pids: set[int] = set()
        self._recorded_strays: set[int] = set()  # live strays written to the state
        self._changed = trio.Event()
        self._resolve_lock = trio.Lock()

    # --- pods -----------------------------------------------------------------

    async def create_pod(self, config: PodConfig) -> str:
        """Create a READY pod; return its id.

        Idempotent: the same (namespace, name, uid, attempt) returns the
        existing pod's id if its config is equal; otherwise
        :class:`AlreadyExistsError`.
        """
        config = _frozen_pod_config(config)
        key = (config.namespace, config.name, config.uid, config.attempt)
        for pod in self._pods.values():
            if (pod.config.namespace, pod.config.name, pod.config.uid, pod.config.attempt) == key:
                if pod.config != config:
                    raise AlreadyExistsError(
                        f"pod {config.name!r} (attempt {config.attempt}) exists with another config"
                    )
                return pod.id
        pod = _Pod(uuid.uuid4().hex, config, PodState.READY, time.time_ns())
        self._pods[pod.id] = pod
        self._save_pod(pod)
        return pod.id

    async def stop_pod(self, pod_id: str) -> None:
        """Stop every container of the pod (each with its own stop policy); mark it NOTREADY.

        Idempotent; an unknown id succeeds.
        """
        pod = self._pods.get(pod_id)
        if pod is None:
            return
        async with trio.open_nursery() as nursery:
            for c in self._containers.values():
                if c.pod_id == pod_id:
                    nursery.start_soon(self.stop_container, c.id)
        if pod.state is not PodState.NOTREADY:
            pod.state = PodState.NOTREADY
            self._save_pod(pod)

    async def remove_pod(self, pod_id: str) -> None:
        """Stop and remove the pod and all its containers. Idempotent."""
        if pod_id not in self._pods:
            return
        await self.stop_pod(pod_id)
        for c in [c for c in self._containers.values() if c.pod_id == pod_id]:
            await self.remove_container(c.id)
        self._pods.pop(pod_id, None)
        self._store.delete_pod(pod_id)

    def pod_status(self, pod_id: str) -> Pod:
        """The pod ``pod_id``; :class:`NotFoundError` if there is none."""
        pod = self._pods.get(pod_id)
        if pod is None:
            raise NotFoundError(f"no pod {pod_id!r}")
        return pod.snapshot()

    def list_pods(
        self,
        *,
        id: str | None = None,
        state: PodState | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Pod]:
        """Pods matching every given filter (``labels``: each key has this value)."""
        return [
            pod.snapshot()
            for pod in self._pods.values()
            if (id is None or pod.id == id)
            and (state is None or pod.state is state)
            and _labels_match(pod.config.labels, labels)
        ]

    # --- containers -----------------------------------------------------------

    async def create_container(
        self, pod_id: str, config: ContainerConfig, *, description: Description | None = None
    ) -> str:
        """Check the description and record a CREATED container; return its id.

        Idempotent: the same (pod, name, attempt) with an equal config returns
        the existing id; a different config raises :class:`AlreadyExistsError`.
        Raises :class:`~supervisor.errors.DescriptionError` for a bad description.
        ``description``: the caller already checked ``config.description_text``
        (``capvisor up`` does, to report problems at their place in the set
        file); it is used instead of parsing the text again.
        """
        pod = self._pods.get(pod_id)
        if pod is None:
            raise NotFoundError(f"no pod {pod_id!r}")
        config = _frozen_container_config(config)
        existing = self._by_name.get((pod_id, config.name, config.attempt))
        if existing is not None:
            if existing.config != config:
                raise AlreadyExistsError(
                    f"container {config.name!r} (attempt {config.attempt}) exists in pod"
                    f" {pod_id} with another config"
                )
            return existing.id
        if description is None:
            description = _parse(config)
        c = _Container(uuid.uuid4().hex, pod_id, config, description, time.time_ns())
        c.log_path = _log_path(pod.config, config)
        self._add(c)
        self._save(c)
        self._notify()
        return c.id

    async def start_container(self, container_id: str) -> None:
        """Resolve and spawn the container; return once it runs.

        Starting a RUNNING container does nothing; starting an EXITED one
        starts it again (``restarts`` is not counted: that is the policy's);
        one waiting to restart is started now. Raises
        :class:`~supervisor.errors.CapvisorError` if it cannot start (the
        container is then EXITED, reason ``ContainerCannotRun``; with a
        restart policy other than ``no`` it is retried like a failed run).
        """
        c = self._get(container_id)
        if c.description is None:
            raise ServiceError(f"container {c.config.name}: {c.message}")
        if c.loop is not None:
            if c.backoff is not None:
                c.backoff.cancel()
            return
        c.tracker = RestartTracker(c.restart_policy)
        c.failed = False
        c.stop_requested = False
        error = await self._nursery.start(self._supervise, c)
        if error is not None:
            raise error

    async def stop_container(self, container_id: str, timeout: float | None = None) -> None:
        """Stop the container's whole tree; return once it exited.

        Sends the description's stop signal, then SIGKILL after ``timeout``
        seconds (None: the description's ``stop.timeout``; 0: SIGKILL at
        once). Cancels a pending restart. Idempotent; an unknown id succeeds.
        Shielded: a cancelled caller still gets the tree killed.
        """
        c = self._containers.get(container_id)
        if c is None or c.loop is None:
            return
        loop = c.loop
        with trio.CancelScope(shield=True):
            c.stop_requested = True
            if c.backoff is not None:
                c.backoff.cancel()
            if c.child is not None and c.description is not None:
                if c.phase != "stopping":
                    c.phase = "stopping"
                    self._save(c)
                policy = c.description.stop
                if timeout is not None:
                    policy = StopPolicy(policy.signal, max(0.0, timeout))
                await _stop_tree(c, policy)
            await loop.wait()

    async def restart_container(self, container_id: str) -> None:
        """Stop (with the description's policy) then start again; clears ``failed``."""
        await self.stop_container(container_id)
        await self.start_container(container_id)

    async def remove_container(self, container_id: str) -> None:
        """Stop the container if it runs, then forget it. Idempotent."""
        c = self._containers.get(container_id)
        if c is None:
            return
        await self.stop_container(container_id)
        self._containers.pop(container_id, None)
        self._by_name.pop((c.pod_id, c.config.name, c.config.attempt), None)
        if c.sink is not None:
            c.sink.close()
            c.sink = None
        if c.cgroup is not None:
            cgroup.Cgroup(c.cgroup).remove()
        self._store.delete_container(container_id)
        self._notify()

    def container_status(self, container_id: str) -> ContainerStatus:
        """The container ``container_id``; :class:`NotFoundError` if there is none."""
        c = self._get(container_id)
        return c.snapshot(report=self._store.report(c.id))

    def list_containers(
        self,
        *,
        id: str | None = None,
        pod_id: str | None = None,
        state: State | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[ContainerStatus]:
        """Containers matching every given filter, in creation order."""
        return [
            c.snapshot()
            for c in self._containers.values()
            if (id is None or c.id == id)
            and (pod_id is None or c.pod_id == pod_id)
            and (state is None or c.state is state)
            and _labels_match(c.config.labels, labels)
        ]

    def find_container(self, name: str, pod_id: str | None = None) -> ContainerStatus:
        """The newest container called ``name`` (in ``pod_id`` if given); NotFoundError else."""
        for c in reversed(self._containers.values()):
            if c.config.name == name and (pod_id is None or c.pod_id == pod_id):
                return c.snapshot()
        raise NotFoundError(f"no container named {name!r}")

    async def wait_container(self, container_id: str) -> ContainerStatus:
        """Wait until the container is EXITED and will not restart; return its status."""
        c = self._get(container_id)
        while c.loop is not None or c.state is not State.EXITED:
            if c.loop is not None:
                await c.loop.wait()
            else:
                await self._wait_changed()
        return c.snapshot()

    async def wait_changed(self) -> None:
        """Wait until any container changes state (for watchers such as ``capvisor up``)."""
        await self._wait_changed()

    def reopen_log(self, container_id: str) -> None:
        """Reopen the container's log file at its path (after it was renamed).

        Raises :class:`ServiceError` if the container has no open log or the
        file cannot be opened (the old file stays in use).
        """
        c = self._get(container_id)
        if c.sink is None:
            raise ServiceError(f"container {c.config.name} has no open log")
        try:
            c.sink.reopen()
        except OSError as exc:
            raise ServiceError(f"reopen {c.log_path}: {exc.strerror}") from exc

    async def exec_sync(
        self, container_id: str, command: Sequence[str], timeout: float | None = None
    ) -> ExecResult:
        """Run ``command`` confined like the container (same fds, mounts, policy, limits).

        ``command[0]`` must be an absolute path. stdin is /dev/null; stdout and
        stderr are captured (at most :data:`EXEC_OUTPUT_LIMIT` bytes each).
        After ``timeout`` seconds the process tree is killed and ``timed_out``
        is True. The container must be RUNNING; the process joins its cgroup.
        """
        c = self._get(container_id)
        if c.state is not State.RUNNING or c.description is None:
            raise ServiceError(f"container {c.config.name} is not running")
        if not command or not command[0].startswith("/"):
            raise ServiceError("exec: the command must start with an absolute path")
        description = dataclasses.replace(
            c.description,
            program=command[0],
            args=tuple(command[1:]),
            stdin=tags.File("/dev/null"),
            stdout=tags.Log("stdout"),
            stderr=tags.Log("stderr"),
        )
        plan = await self._resolve(description, c.config)
        procs_fd = -1
        try:
            if c.cgroup is not None:
                procs_fd = cgroup.Cgroup(c.cgroup).open_procs()
            child = Child.spawn(plan, **_spawn_options(procs_fd))
        except BaseException:
            plan.close()
            raise
        finally:
            if procs_fd >= 0:
                os.close(procs_fd)
        self._exec_pids.add(child.pid)
        pipes = {p.stream: p.read_fd for p in plan.take_log_pipes()}
        plan.close()
        output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        timed_out = False
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                async with trio.open_nursery() as nursery:
                    for stream, fd in pipes.items():
                        nursery.start_soon(_capture, fd, output[stream])
                    pipes = {}
                    status = await child.wait()
            if scope.cancelled_caught:
                timed_out = True
                status = await child.stop(StopPolicy(signal.SIGKILL, 0.0))
        finally:
            for fd in pipes.values():
                os.close(fd)
            child.close()
            self._exec_pids.discard(child.pid)
        return ExecResult(
            status.shell_code, bytes(output["stdout"]), bytes(output["stderr"]), timed_out
        )

    # --- internals ------------------------------------------------------------

    def _add(self, c: _Container) -> None:
        self._containers[c.id] = c
        self._by_name[(c.pod_id, c.config.name, c.config.attempt)] = c

    def _get(self, container_id: str) -> _Container:
        c = self._containers.get(container_id)
        if c is None:
            raise NotFoundError(f"no container {container_id!r}")
        return c

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _event(self, message: str) -> None:
        if self._on_event is not None:
            self._on_event(message)

    def _save(self, c: _Container) -> None:
        self._store.put_container(c.id, c.pod_id, c.to_json())

    def _save_pod(self, pod: _Pod) -> None:
        self._store.put_pod(pod.id, pod.to_json())

    async def _resolve(self, description: Description, config: ContainerConfig) -> LaunchPlan:
        kwargs: dict[str, Any] = {"mounts": dict(config.mounts)}
        if config.identity:
            kwargs["identity"] = dict(config.identity)
        if self._switchboard is not None:
            # The broker may run on this very trio loop: resolve in a thread,
            # one at a time (a switchboard handle answers one request at a time).
            kwargs["switchboard"] = self._switchboard
            async with self._resolve_lock:
                return await trio.to_thread.run_sync(
                    functools.partial(resolve, description, **kwargs)
                )
        return resolve(description, **kwargs)

    async def _supervise(
        self,
        c: _Container,
        *,
        task_status: trio.TaskStatus[CapvisorError | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``c`` until it is stopped or its restart policy is done (one task).

        Started with ``nursery.start``: reports None once the program runs, or
        the error of a first start that failed but will be retried.
        """
        c.loop = trio.Event()
        first = True
        try:
            while True:
                try:
                    status, ran_for = await self._run_once(c, task_status if first else None)
                except CapvisorError as exc:
                    self._exited(c, None, REASON_CANNOT_RUN, str(exc))
                    if first and c.restart_policy.policy == "no":
                        raise
                    if first:  # the caller hears of it; the restart policy retries
                        task_status.started(exc)
                    status, ran_for = None, 0.0
                except Exception as exc:  # a bug: record it, keep the supervisor running
                    message = f"internal error: {type(exc).__name__}: {exc}"
                    self._exited(c, None, REASON_INTERNAL, message)
                    self._event(f"{c.config.name}: {message}")
                    if first:
                        raise ServiceError(f"{c.config.name}: {message}") from exc
                    break
                first = False
                if c.stop_requested:
                    break
                failed = status is None or status.code != 0
                decision = c.tracker.exited(failed=failed, ran_for=ran_for)
                if decision.action == "done":
                    break
                if decision.action == "give-up":
                    c.failed = True
                    c.phase = "failed"
                    c.reason = REASON_CRASH_LOOP
                    c.message = f"{decision.reason}; last: {c.message}"
                    self._save(c)
                    self._event(f"{c.config.name}: failed: {c.message}")
                    break
                c.phase = "backoff"
                c.next_restart_ns = time.time_ns() + int(decision.delay * 1e9)
                self._save(c)
                self._notify()
                with trio.CancelScope() as c.backoff:
                    await trio.sleep(decision.delay)
                c.backoff = None
                c.next_restart_ns = 0
                if c.stop_requested:
                    c.phase = "exited"
                    self._save(c)
                    break
                c.restarts += 1
        finally:
            loop, c.loop = c.loop, None
            loop.set()
            self._notify()

    async def _run_once(
        self, c: _Container, task_status: trio.TaskStatus[CapvisorError | None] | None
    ) -> tuple[ExitStatus, float]:
        assert c.description is not None
        plan = await self._resolve(c.description, c.config)
        procs_fd = -1
        report = plan.report()
        try:
            if c.sink is None:
                c.sink = _open_log(c)
            report["cgroup"] = self._place(c, report)
            if c.cgroup is not None:
                procs_fd = cgroup.Cgroup(c.cgroup).open_procs()
        except OSError as exc:
            plan.close()
            raise ServiceError(f"cgroup {c.cgroup}: {exc.strerror}") from exc
        except BaseException:
            plan.close()
            raise
        c.confinement = _summary(report)
        self._store.put_report(c.id, report)
        started = trio.current_time()
        status: ExitStatus | None = None
        try:
            async with trio.open_nursery() as nursery:

                def on_started(child: Child) -> None:
                    if procs_fd >= 0:
                        os.close(procs_fd)
                    c.child = child
                    c.pid = child.pid
                    c.proc_start = proctree.start_time(child.pid) or 0
                    c.state, c.phase = State.RUNNING, "running"
                    c.started_ns = time.time_ns()  # the last exit's fields stay: `ps` shows them
                    self._save(c)
                    self._notify()
                    if task_status is not None:
                        task_status.started(None)
                    nursery.start_soon(_end_tree_with, c, child)
                    if c.stop_requested:  # asked to stop while it was being resolved
                        assert c.description is not None
                        nursery.start_soon(_stop_tree, c, c.description.stop)

                try:
                    status = await run_plan(
                        plan,
                        c.sink,
                        stop_signals=(),
                        on_started=on_started,
                        drain_grace=DRAIN_GRACE,
                        spawn_options=_spawn_options(procs_fd),
                    )
                except BaseException:
                    if c.child is None and procs_fd >= 0:
                        os.close(procs_fd)
                    raise
        finally:
            if c.child is not None:
                c.child = None
        ran_for = trio.current_time() - started
        assert status is not None
        oom = c.cgroup is not None and cgroup.Cgroup(c.cgroup).oom_killed()
        reason, message = _classify(status, c.stop_requested, oom)
        self._exited(c, status, reason, message)
        return status, ran_for

    def _place(self, c: _Container, report: dict[str, Any]) -> dict[str, Any]:
        """Make the container's cgroup (a fresh one per start); what the report says of it."""
        assert c.description is not None
        limits = dict(c.description.cgroup_limits)
        if c.cgroup is not None:
            cgroup.Cgroup(c.cgroup).remove()
            c.cgroup = None
        if self.cgroups.base is None:
            missing = [f"limits.{key}: not applied: {self.cgroups.reason}" for key in limits]
            self._refuse_unless_degraded(c, missing)
            report["degraded"].extend(missing)
            return {"applied": False, "reason": self.cgroups.reason}
        try:
            group, skipped = cgroup.Cgroup.create(self.cgroups, c.id, limits)
        except OSError as exc:
            reason = f"cannot create a cgroup in {self.cgroups.base}: {exc.strerror}"
            missing = [f"limits.{key}: not applied: {reason}" for key in limits]
            self._refuse_unless_degraded(c, missing)
            report["degraded"].extend(missing)
            return {"applied": False, "reason": reason}
        c.cgroup = str(group.path)
        report["degraded"].extend(skipped)
        if skipped:
            self._refuse_unless_degraded(c, skipped)
        applied = {
            k: v
            for k, v in limits.items()
            if not any(s.startswith(f"limits.{k}:") for s in skipped)
        }
        return {"applied": True, "path": c.cgroup, "limits": applied, "not_applied": skipped}

    def _refuse_unless_degraded(self, c: _Container, missing: list[str]) -> None:
        """Fail closed on cgroup limits that cannot apply, unless ``degrade: allow``."""
        assert c.description is not None
        if not missing or c.description.degrade == "allow":
            return
        if c.cgroup is not None:
            cgroup.Cgroup(c.cgroup).remove()
            c.cgroup = None
        where = c.description.at("limits")
        raise ConfinementError(
            f"{where}: {missing[0]}; set `degrade: allow` to run without it"
            if where
            else f"{missing[0]}; set `degrade: allow` to run without it"
        )

    def _exited(self, c: _Container, status: ExitStatus | None, reason: str, message: str) -> None:
        c.state, c.phase = State.EXITED, "exited"
        c.pid = None
        c.finished_ns = time.time_ns()
        if status is None:
            c.exit_code, c.signal = EXIT_NOT_FOUND, None  # could not run, as a shell says
        else:
            c.exit_code, c.signal = status.shell_code, status.signal
        c.reason, c.message = reason, message
        self._save(c)
        self._notify()
        if reason == REASON_CANNOT_RUN:
            self._event(f"{c.config.name}: cannot run: {message}")

    # --- lifetime -------------------------------------------------------------

    def _recover(self) -> None:
        """Load the state; kill what a dead supervisor left running; say so truthfully."""
        same_boot = self._store.get_meta("boot_id") == proctree.boot_id()
        previous = self._store.get_meta("supervisor_pid") or "?"
        now = time.time_ns()
        for pod_id, data in self._store.pods():
            self._pods[pod_id] = _Pod.from_json(pod_id, data)
        for cid, pod_id, data in self._store.containers():
            c = _Container.from_json(cid, pod_id, data)
            if c.phase in ("running", "stopping", "backoff"):
                killed = _kill_leftovers(c) if same_boot else []
                was = c.phase
                c.state, c.phase = State.EXITED, "exited"
                c.finished_ns = c.finished_ns if was == "backoff" else now
                if was != "backoff":
                    c.exit_code, c.signal = 128 + signal.SIGKILL, signal.SIGKILL
                    c.reason = REASON_SUPERVISOR_DIED
                    c.message = (
                        f"the supervisor (pid {previous}) died while this program ran"
                        f" (pid {c.pid}); "
                        + (
                            f"its processes were killed at restart ({', '.join(killed)})"
                            if killed
                            else "none of its processes was left at restart"
                            if same_boot
                            else "the machine rebooted since"
                        )
                    )
                else:
                    c.message += "; its restart was cancelled: the supervisor died"
                c.pid = None
                self._store.put_container(cid, pod_id, c.to_json())
            elif c.cgroup is not None:
                cgroup.kill_leftover(c.cgroup)
            self._add(c)
        if same_boot:
            for pid, start in self._store.strays():
                proctree.kill_if_same(pid, start)
        for pid, _ in self._store.strays():
            self._store.remove_stray(pid)
        self._store.set_meta("boot_id", proctree.boot_id())
        self._store.set_meta("supervisor_pid", str(os.getpid()))

    async def _shutdown(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in list(self._containers.values()):
                if c.loop is not None:
                    nursery.start_soon(self.stop_container, c.id)
        for c in self._containers.values():
            if c.sink is not None:
                c.sink.close()
                c.sink = None
            if c.cgroup is not None and cgroup.Cgroup(c.cgroup).remove():
                c.cgroup = None
                self._save(c)
        if self.cgroups.base is not None:
            with contextlib.suppress(OSError):
                self.cgroups.base.rmdir()
        # Strays the subreaper adopted (no cgroup could hold them): kill them too.
        _, alive = proctree.reap_strays(self._known_pids())
        proctree.kill_all(alive, signal.SIGKILL)
        for pid in alive:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._store.remove_stray(pid)

    def _known_pids(self) -> set[int]:
        known = {c.child.pid for c in self._containers.values() if c.child is not None}
        return known | self._exec_pids

    def _record_strays(self, reaped: list[int], alive: list[int]) -> None:
        """Keep the live strays in the state (killed at shutdown or the next start)."""
        for pid in reaped:
            if pid in self._recorded_strays:
                self._recorded_strays.discard(pid)
                self._store.remove_stray(pid)
        for pid in alive:
            if pid not in self._recorded_strays and (start := proctree.start_time(pid)) is not None:
                self._recorded_strays.add(pid)
                self._store.add_stray(pid, start)


#: The most output :meth:`Service.exec_sync` keeps per stream.
EXEC_OUTPUT_LIMIT = 16 << 20


@asynccontextmanager
async def open_service(
    state_dir: str | os.PathLike[str],
    *,
    switchboard: SwitchboardAccess | None = None,
    cgroups: bool = True,
    subreaper: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> AsyncIterator[Service]:
    """Open the backend whose durable state lives in ``state_dir``.

    ``switchboard`` resolves ``!server``/``!client``/``!connect`` (resolution
    then runs in a worker thread, so the broker may run on this trio loop).
    ``cgroups``: give each container a cgroup v2 where possible. ``subreaper``:
    make this process the child subreaper while open (the previous setting is
    restored), reaping (and at shutdown killing) orphaned descendants: it
    reaps and kills children it did not spawn that are in a session other than
    this process's, so other children of an embedding program must not be
    started in sessions of their own. ``on_event`` gets one-line messages (a
    program failed, could not run). Raises
    :class:`~supervisor.state.StateError` if the state directory is in use by
    another supervisor or unusable.

    On exit every running container is stopped with its stop policy.
    """
    store = StateStore(state_dir)
    try:
        instance = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
        support = cgroup.probe(instance) if cgroups else cgroup.Support(None, reason="disabled")
        async with trio.open_nursery() as nursery:
            service = Service(
                store, nursery, switchboard=switchboard, cgroups=support, on_event=on_event
            )
            service._recover()
            was_subreaper = proctree.set_child_subreaper(True) if subreaper else None
            if subreaper:
                nursery.start_soon(reap_adopted, service._known_pids, service._record_strays)
            try:
                yield service
            finally:
                with trio.CancelScope(shield=True):
                    await service._shutdown()
                nursery.cancel_scope.cancel()
                if was_subreaper is not None:
                    proctree.set_child_subreaper(was_subreaper)
                    proctree.reap_strays(service._known_pids())  # adopted before that
    finally:
        store.close()


# --- per-object state -------------------------------------------------------------


@dataclass
class _Pod:
    id: str
    config: PodConfig
    state: PodState
    created_ns: int

    def snapshot(self) -> Pod:
        return Pod(self.id, self.config, self.state, self.created_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "state": self.state.value,
            "created_ns": self.created_ns,
        }

    @classmethod
    def from_json(cls, pod_id: str, data: dict[str, Any]) -> _Pod:
        config = _frozen_pod_config(PodConfig(**data["config"]))
        return cls(pod_id, config, PodState(data["state"]), int(data["created_ns"]))


class _Container:
    """A container's mutable state and its running parts (child, log sink, tasks)."""

    def __init__(
        self,
        cid: str,
        pod_id: str,
        config: ContainerConfig,
        description: Description | None,
        created_ns: int,
    ) -> None:
        self.id = cid
        self.pod_id = pod_id
        self.config = config
        self.description = description
        self.created_ns = created_ns
        self.state = State.CREATED if description is not None else State.UNKNOWN
        self.phase = self.state.value
        self.started_ns = self.finished_ns = 0
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.reason = self.message = ""
        self.pid: int | None = None
        self.proc_start = 0
        self.restarts = 0
        self.failed = False
        self.next_restart_ns = 0
        self.log_path = ""
        self.cgroup: str | None = None
        self.confinement = ""
        # running parts
        self.child: Child | None = None
        self.sink: LogFile | None = None
        self.loop: trio.Event | None = None  # set when the supervising task ends
        self.backoff: trio.CancelScope | None = None
        self.stop_requested = False
        self.tracker = RestartTracker(self.restart_policy)

    @property
    def restart_policy(self) -> RestartPolicy:
        if self.config.restart is not None:
            return self.config.restart
        return self.description.restart if self.description is not None else RestartPolicy()

    def snapshot(self, report: Mapping[str, object] | None = None) -> ContainerStatus:
        return ContainerStatus(
            id=self.id,
            pod_id=self.pod_id,
            name=self.config.name,
            attempt=self.config.attempt,
            state=self.state,
            phase=self.phase,
            created_ns=self.created_ns,
            started_ns=self.started_ns,
            finished_ns=self.finished_ns,
            exit_code=self.exit_code,
            signal=self.signal,
            reason=self.reason,
            message=self.message,
            pid=self.pid,
            restarts=self.restarts,
            failed=self.failed,
            next_restart_ns=self.next_restart_ns,
            labels=self.config.labels,
            annotations=self.config.annotations,
            log_path=self.log_path,
            description_file=self.config.description_file,
            cgroup=self.cgroup,
            confinement=self.confinement,
            report=report or {},
        )

    _FIELDS = (
        "created_ns", "started_ns", "finished_ns", "exit_code", "signal", "reason", "message",
        "pid", "proc_start", "restarts", "failed", "next_restart_ns", "log_path", "cgroup",
        "confinement", "phase",
    )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in self._FIELDS}
        data["state"] = self.state.value
        config = dataclasses.asdict(self.config)
        config["mounts"] = {k: dataclasses.asdict(v) for k, v in self.config.mounts.items()}
        data["config"] = config
        return data

    @classmethod
    def from_json(cls, cid: str, pod_id: str, data: dict[str, Any]) -> _Container:
        raw = dict(data["config"])
        raw["mounts"] = {k: HostMount(**v) for k, v in raw["mounts"].items()}
        if raw["restart"] is not None:
            raw["restart"] = RestartPolicy(**raw["restart"])
        config = _frozen_container_config(ContainerConfig(**raw))
        description: Description | None
        problem = ""
        try:
            description = _parse(config)
        except ProblemsError as exc:
            description, problem = None, str(exc)
        c = cls(cid, pod_id, config, description, int(data["created_ns"]))
        for key in cls._FIELDS:
            setattr(c, key, data.get(key, getattr(c, key)))
        c.state = State(data["state"])
        if description is None:
            c.state, c.phase = State.UNKNOWN, "unknown"
            c.message = f"the recorded description no longer loads: {problem}"
        return c


# --- helpers -------------------------------------------------------------------


def _frozen_pod_config(config: PodConfig) -> PodConfig:
    return dataclasses.replace(
        config, labels=dict(config.labels), annotations=dict(config.annotations)
    )


def _frozen_container_config(config: ContainerConfig) -> ContainerConfig:
    return dataclasses.replace(
        config,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        mounts=dict(config.mounts),
        identity=dict(config.identity),
    )


def _labels_match(have: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return not want or all(have.get(k) == v for k, v in want.items())


def _parse(config: ContainerConfig) -> Description:
    context = Context(allow_fd=False, mounts=dict(config.mounts) if config.mounts else None)
    return parse_description(config.description_text, config.description_file, context=context)


def _log_path(pod: PodConfig, config: ContainerConfig) -> str:
    name = config.log_path or f"{config.name}.log"
    if os.path.isabs(name):
        return name
    if pod.log_directory is None:
        raise ServiceError(
            f"container {config.name}: log_path {name!r} is relative and the pod has no"
            " log_directory"
        )
    return os.path.join(pod.log_directory, name)


def _open_log(c: _Container) -> LogFile:
    assert c.description is not None
    settings = c.description.log
    try:
        os.makedirs(os.path.dirname(c.log_path) or ".", exist_ok=True)
        return LogFile(
            c.log_path,
            max_size=settings.max_size,
            max_files=settings.max_files,
            on_event=functools.partial(_report_log_event, c.config.name),
        )
    except OSError as exc:
        raise ServiceError(f"container {c.config.name}: log {c.log_path}: {exc.strerror}") from exc


def _report_log_event(name: str, event: LogEvent) -> None:
    """A full disk, a recovery, lost records: said on the supervisor's stderr."""
    if event.kind != "rotated":
        print(f"capvisor: {name}: {event}", file=sys.stderr, flush=True)


def _spawn_options(procs_fd: int) -> dict[str, Any]:
    return {"cgroup_procs_fd": procs_fd, "parent_death_signal": signal.SIGKILL}


def _summary(report: Mapping[str, Any]) -> str:
    landlock = report.get("landlock", {})
    seccomp = report.get("seccomp", {})
    group = report.get("cgroup", {})
    parts = [
        f"landlock:{landlock.get('abi', 0)}" if landlock.get("applied", True) else "landlock:off",
        f"seccomp:{seccomp.get('policy', 'off')}",
        "cgroup" if group.get("applied") else "no-cgroup",
    ]
    if report.get("degraded"):
        parts.append(f"degraded:{len(report['degraded'])}")
    return " ".join(parts)


def _classify(status: ExitStatus, stop_requested: bool, oom: bool) -> tuple[str, str]:
    if oom:
        return REASON_OOM, f"{status}; the cgroup's memory limit was hit"
    if status.signal is not None:
        why = " (stopped)" if stop_requested else ""
        return REASON_KILLED, f"{status}{why}"
    if status.code == 0:
        return REASON_COMPLETED, str(status)
    return REASON_ERROR, str(status)


async def _stop_tree(c: _Container, policy: StopPolicy) -> None:
    """Stop signal to the whole tree, SIGKILL to the whole tree after the timeout."""
    child = c.child
    if child is None:
        return
    group = cgroup.Cgroup(c.cgroup) if c.cgroup is not None else None

    def send(sig: int) -> None:
        child.send_signal(sig)
        if group is not None:
            group.signal(sig)
        else:
            proctree.kill_all(proctree.tree(child.pid, since=c.proc_start), sig)

    send(policy.signal)
    with trio.move_on_after(policy.timeout):
        await child.wait()
        while group is not None and group.populated():
            await trio.sleep(0.02)
        return
    if group is not None:
        group.kill()
    send(signal.SIGKILL)
    await child.wait()


async def _end_tree_with(c: _Container, child: Child) -> None:
    """When the program exits, nothing of its tree may outlive it: kill the rest."""
    await child.wait()
    if c.cgroup is not None:
        cgroup.Cgroup(c.cgroup).kill()
    else:
        proctree.kill_all(proctree.tree(child.pid, since=c.proc_start), signal.SIGKILL)


def _kill_leftovers(c: _Container) -> list[str]:
    """At restart, kill what is left of a container the dead supervisor ran."""
    killed = []
    if c.cgroup is not None:
        group = cgroup.Cgroup(c.cgroup)
        pids = group.pids()
        if group.remove():
            c.cgroup = None
        if pids:
            killed.append(f"cgroup: {len(pids)} process(es)")
    if c.pid is not None:
        if proctree.kill_if_same(c.pid, c.proc_start):
            killed.append(f"pid {c.pid}")
        rest = proctree.tree(c.pid, since=c.proc_start)
        proctree.kill_all(rest, signal.SIGKILL)
        if rest:
            killed.append(f"session {c.pid}: {len(rest)} process(es)")
    return killed


async def _capture(fd: int, into: bytearray) -> None:
    stream = trio.lowlevel.FdStream(fd)
    try:
        while chunk := await stream.receive_some(65536):
            room = EXEC_OUTPUT_LIMIT - len(into)
            if room > 0:
                into += chunk[:room]
    finally:
        await stream.aclose()
