"""The CRI RuntimeService over the embeddable backend (:mod:`supervisor.service`).

Each method is an async handler run on the trio thread (see
:mod:`supervisor.cri.server`). Idempotency and NotFound follow the CRI's
comments: stopping or removing a pod or container that is already gone
succeeds; the status (and start, stats, exec, log reopen) of an unknown id
is NotFound; an empty id is InvalidArgument.

What the backend does not keep — a container's image and its CRI mounts,
which its status reports — is kept by :mod:`supervisor.cri.records`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import trio
from cri_api.v1 import api_pb2

from .. import __version__, policy, policy_oci
from ..description import RestartPolicy
from ..service import (
    ContainerConfig,
    ContainerStatus,
    NotFoundError,
    Pod,
    PodConfig,
    PodState,
    Service,
    State,
)
from . import stats
from .images import ImageStore
from .programs import container_program, seccomp_policy
from .records import Records
from .status import CriError, invalid, not_found, require_id

#: CRI API version we speak (VersionResponse.version is the kubelet's concern).
API_VERSION = "v1"
#: ExecSync caps each of stdout and stderr at this many bytes.
EXEC_OUTPUT_CAP = 16 << 20
#: Where a command given by name in ExecSync is looked for.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_STATES = {
    State.CREATED: api_pb2.CONTAINER_CREATED,
    State.RUNNING: api_pb2.CONTAINER_RUNNING,
    State.EXITED: api_pb2.CONTAINER_EXITED,
    State.UNKNOWN: api_pb2.CONTAINER_UNKNOWN,
}
_STATE_OF = {v: k for k, v in _STATES.items()}
_POD_STATES = {PodState.READY: api_pb2.SANDBOX_READY, PodState.NOTREADY: api_pb2.SANDBOX_NOTREADY}
_POD_STATE_OF = {v: k for k, v in _POD_STATES.items()}
_NO_NAMESPACES = api_pb2.NamespaceOption(network=api_pb2.NODE, pid=api_pb2.NODE, ipc=api_pb2.NODE)
#: A policy for Unconfined (only with --allow-unconfined): every syscall allowed and
#: audited, except those capvisor always denies.
UNCONFINED_POLICY = """\
# Written by `capvisor cri serve --allow-unconfined` for seccomp profile Unconfined.
version: 1
default: log
"""


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class RuntimeService:
    """The RuntimeService RPCs the CRI frontend implements (others: UNIMPLEMENTED)."""

    def __init__(
        self,
        service: Service,
        images: ImageStore,
        root: Path,
        *,
        allow_unconfined: bool = False,
    ) -> None:
        self.service = service
        self.images = images
        self.root = root
        self.allow_unconfined = allow_unconfined
        self.records = Records(root / "cri.db")
        self.unconfined_policy = root / "unconfined.yaml"
        if allow_unconfined:
            self.unconfined_policy.write_text(UNCONFINED_POLICY)

    def close(self) -> None:
        """Close the container records (the backend is the caller's)."""
        self.records.close()

    # --- runtime ----------------------------------------------------------------

    async def Version(self, request: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version="0.1.0",
            runtime_name="capvisor",
            runtime_version=__version__,
            runtime_api_version=API_VERSION,
        )

    async def Status(self, request: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
        conditions = [
            api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
            api_pb2.RuntimeCondition(
                type="NetworkReady",
                status=True,
                message="capvisor pods share the node's network namespace; "
                "programs reach the network only through capabilities",
            ),
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(
                {"root": str(self.root), "allow_unconfined": self.allow_unconfined}
            )
        return api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=conditions), info=info
        )

    async def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        # The only setting is the pod CIDR; capvisor gives pods no network of their own.
        return api_pb2.UpdateRuntimeConfigResponse()

    # --- pods -------------------------------------------------------------------

    async def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest
    ) -> api_pb2.RunPodSandboxResponse:
        config = request.config
        if request.runtime_handler not in ("", "capvisor"):
            raise invalid(
                "RunPodSandboxRequest.runtime_handler",
                f"unknown runtime handler {request.runtime_handler!r} (capvisor has only the "
                "default one)",
            )
        if not config.metadata.name:
            raise invalid("RunPodSandboxRequest.config.metadata.name", "must not be empty")
        if config.log_directory and not config.log_directory.startswith("/"):
            raise invalid("RunPodSandboxRequest.config.log_directory", "must be an absolute path")
        pod_id = await self.service.create_pod(
            PodConfig(
                name=config.metadata.name,
                namespace=config.metadata.namespace,
                uid=config.metadata.uid,
                attempt=config.metadata.attempt,
                labels=dict(config.labels),
                annotations=dict(config.annotations),
                log_directory=config.log_directory or None,
            )
        )
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    async def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest
    ) -> api_pb2.StopPodSandboxResponse:
        pod_id = require_id("StopPodSandboxRequest.pod_sandbox_id", request.pod_sandbox_id)
        await self.service.stop_pod(pod_id)
        return api_pb2.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest
    ) -> api_pb2.RemovePodSandboxResponse:
        pod_id = require_id("RemovePodSandboxRequest.pod_sandbox_id", request.pod_sandbox_id)
        containers = [c.id for c in self.service.list_containers(pod_id=pod_id)]
        await self.service.remove_pod(pod_id)
        self.records.drop(containers)
        return api_pb2.RemovePodSandboxResponse()

    def _pod(self, field: str, pod_id: str) -> Pod:
        require_id(field, pod_id)
        try:
            return self.service.pod_status(pod_id)
        except NotFoundError:
            raise not_found("pod sandbox", pod_id) from None

    async def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest
    ) -> api_pb2.PodSandboxStatusResponse:
        pod = self._pod("PodSandboxStatusRequest.pod_sandbox_id", request.pod_sandbox_id)
        status = api_pb2.PodSandboxStatus(
            id=pod.id,
            metadata=_pod_metadata(pod.config),
            state=_POD_STATES[pod.state],
            created_at=pod.created_ns,
            network=api_pb2.PodSandboxNetworkStatus(),
            linux=api_pb2.LinuxPodSandboxStatus(
                namespaces=api_pb2.Namespace(options=_NO_NAMESPACES)
            ),
            labels=dict(pod.config.labels),
            annotations=dict(pod.config.annotations),
        )
        containers = [
            self._container_status(c) for c in self.service.list_containers(pod_id=pod.id)
        ]
        return api_pb2.PodSandboxStatusResponse(
            status=status, containers_statuses=containers, timestamp=time.time_ns()
        )

    async def ListPodSandbox(
        self, request: api_pb2.ListPodSandboxRequest
    ) -> api_pb2.ListPodSandboxResponse:
        f = request.filter
        state = _POD_STATE_OF[f.state.state] if f.HasField("state") else None
        pods = self.service.list_pods(state=state, labels=dict(f.label_selector) or None)
        items = [
            api_pb2.PodSandbox(
                id=pod.id,
                metadata=_pod_metadata(pod.config),
                state=_POD_STATES[pod.state],
                created_at=pod.created_ns,
                labels=dict(pod.config.labels),
                annotations=dict(pod.config.annotations),
            )
            for pod in pods
            if pod.id.startswith(f.id) and _matches(pod.config.labels, f.label_selector)
        ]
        return api_pb2.ListPodSandboxResponse(items=items)

    # --- containers -------------------------------------------------------------

    async def CreateContainer(
        self, request: api_pb2.CreateContainerRequest
    ) -> api_pb2.CreateContainerResponse:
        pod = self._pod("CreateContainerRequest.pod_sandbox_id", request.pod_sandbox_id)
        config = request.config
        if not config.metadata.name:
            raise invalid("CreateContainerRequest.config.metadata.name", "must not be empty")
        reference = config.image.image
        image = self.images.lookup(reference) if reference else None
        if image is None:
            raise CriError(
                grpc.StatusCode.NOT_FOUND,
                f"CreateContainerRequest.config.image.image: image {reference!r} is not "
                "pulled (PullImage it first)",
            )
        chosen = seccomp_policy(
            config.linux.security_context,
            allow_unconfined=self.allow_unconfined,
            unconfined_policy=str(self.unconfined_policy),
        )
        if chosen.endswith(".json"):
            chosen = await trio.to_thread.run_sync(self._imported_policy, chosen)
        meta = pod.config
        program = container_program(
            config,
            meta.annotations,
            program=str(image.path),
            policy=chosen,
            identity=f"{meta.namespace}/{meta.name}/{config.metadata.name}",
        )
        # The policy must compile now, not at StartContainer (cached by file times).
        await trio.to_thread.run_sync(policy.compiled, chosen)
        container_id = await self.service.create_container(
            pod.id,
            ContainerConfig(
                name=config.metadata.name,
                description_text=program.text,
                description_file=program.filename,
                attempt=config.metadata.attempt,
                labels=dict(config.labels),
                annotations=dict(config.annotations),
                mounts=program.mounts,
                log_path=config.log_path or None,
                restart=RestartPolicy("no"),
                identity={
                    "program": f"{meta.namespace}/{meta.name}/{config.metadata.name}",
                    "namespace": meta.namespace,
                    "pod": meta.name,
                    "container": config.metadata.name,
                },
            ),
        )
        self.records.put(
            container_id,
            {
                "image": reference,
                "image_id": image.id,
                "mounts": [
                    {
                        "container_path": m.container_path,
                        "host_path": m.host_path,
                        "readonly": m.readonly,
                    }
                    for m in config.mounts
                ],
                "stop_signal": config.stop_signal,
            },
        )
        return api_pb2.CreateContainerResponse(container_id=container_id)

    def _status(self, field: str, container_id: str) -> ContainerStatus:
        require_id(field, container_id)
        try:
            return self.service.container_status(container_id)
        except NotFoundError:
            raise not_found("container", container_id) from None

    def _imported_policy(self, path: str) -> str:
        """Our YAML for the OCI/Docker seccomp JSON at ``path``, under ``ROOT/policies``.

        Raises :class:`~supervisor.errors.PolicyError` (with the JSON's line
        and column) for a profile that cannot be imported.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise invalid(
                "CreateContainerRequest.config.linux.security_context.seccomp",
                f"Localhost profile {path}: {exc.strerror}",
            ) from exc
        imported = policy_oci.import_oci(text, path)
        digest = hashlib.sha256(imported.yaml.encode()).hexdigest()[:16]
        target = self.root / "policies" / f"{Path(path).stem}-{digest}.yaml"
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=".import-")
            with os.fdopen(handle, "w") as out:
                out.write(imported.yaml)
            os.replace(tmp, target)
        return str(target)

    async def StartContainer(
        self, request: api_pb2.StartContainerRequest
    ) -> api_pb2.StartContainerResponse:
        status = self._status("StartContainerRequest.container_id", request.container_id)
        if status.state == State.EXITED:
            raise CriError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {status.id} has exited; a CRI container runs once (create a new one)",
            )
        await self.service.start_container(status.id)  # RUNNING: nothing to do
        return api_pb2.StartContainerResponse()

    async def StopContainer(
        self, request: api_pb2.StopContainerRequest
    ) -> api_pb2.StopContainerResponse:
        container_id = require_id("StopContainerRequest.container_id", request.container_id)
        if request.timeout < 0:
            raise invalid("StopContainerRequest.timeout", "must not be negative")
        await self.service.stop_container(container_id, timeout=float(request.timeout))
        return api_pb2.StopContainerResponse()

    async def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest
    ) -> api_pb2.RemoveContainerResponse:
        container_id = require_id("RemoveContainerRequest.container_id", request.container_id)
        await self.service.remove_container(container_id)
        self.records.drop([container_id])
        return api_pb2.RemoveContainerResponse()

    async def ListContainers(
        self, request: api_pb2.ListContainersRequest
    ) -> api_pb2.ListContainersResponse:
        f = request.filter
        state = _STATE_OF[f.state.state] if f.HasField("state") else None
        found = self.service.list_containers(
            pod_id=f.pod_sandbox_id or None, state=state, labels=dict(f.label_selector) or None
        )
        containers = []
        for c in found:
            if not c.id.startswith(f.id) or not _matches(c.labels, f.label_selector):
                continue
            extra = self.records.get(c.id)
            containers.append(
                api_pb2.Container(
                    id=c.id,
                    pod_sandbox_id=c.pod_id,
                    metadata=api_pb2.ContainerMetadata(name=c.name, attempt=c.attempt),
                    image=api_pb2.ImageSpec(image=extra.get("image", "")),
                    image_ref=extra.get("image_id", ""),
                    image_id=extra.get("image_id", ""),
                    state=_STATES[c.state],
                    created_at=c.created_ns,
                    labels=dict(c.labels),
                    annotations=dict(c.annotations),
                )
            )
        return api_pb2.ListContainersResponse(containers=containers)

    def _container_status(self, c: ContainerStatus) -> api_pb2.ContainerStatus:
        extra = self.records.get(c.id)
        return api_pb2.ContainerStatus(
            id=c.id,
            metadata=api_pb2.ContainerMetadata(name=c.name, attempt=c.attempt),
            state=_STATES[c.state],
            created_at=c.created_ns,
            started_at=c.started_ns,
            finished_at=c.finished_ns,
            exit_code=c.exit_code or 0,
            image=api_pb2.ImageSpec(image=extra.get("image", "")),
            image_ref=extra.get("image_id", ""),
            image_id=extra.get("image_id", ""),
            reason=c.reason,
            message=c.message,
            labels=dict(c.labels),
            annotations=dict(c.annotations),
            mounts=[api_pb2.Mount(**m) for m in extra.get("mounts", [])],
            log_path=c.log_path,
            stop_signal=extra.get("stop_signal", 0),
        )

    async def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest
    ) -> api_pb2.ContainerStatusResponse:
        status = self._status("ContainerStatusRequest.container_id", request.container_id)
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {"pid": status.pid, "confinement": status.report, "phase": status.phase},
                default=str,
            )
        return api_pb2.ContainerStatusResponse(status=self._container_status(status), info=info)

    async def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest
    ) -> api_pb2.ReopenContainerLogResponse:
        status = self._status("ReopenContainerLogRequest.container_id", request.container_id)
        if status.state != State.RUNNING:
            raise CriError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {status.id} is not running; its log is not reopened",
            )
        self.service.reopen_log(status.id)
        return api_pb2.ReopenContainerLogResponse()

    # --- stats ------------------------------------------------------------------

    def _stats(self, c: ContainerStatus) -> api_pb2.ContainerStats:
        now = time.time_ns()
        attributes = api_pb2.ContainerAttributes(
            id=c.id,
            metadata=api_pb2.ContainerMetadata(name=c.name, attempt=c.attempt),
            labels=dict(c.labels),
            annotations=dict(c.annotations),
        )
        result = api_pb2.ContainerStats(
            attributes=attributes,
            writable_layer=api_pb2.FilesystemUsage(
                timestamp=now,
                fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.root)),
                used_bytes=api_pb2.UInt64Value(value=0),
                inodes_used=api_pb2.UInt64Value(value=0),
            ),
        )
        found = stats.usage(c.cgroup, c.pid) if c.state == State.RUNNING and c.pid else None
        if found is not None:
            result.cpu.CopyFrom(
                api_pb2.CpuUsage(
                    timestamp=now,
                    usage_core_nano_seconds=api_pb2.UInt64Value(value=found.cpu_ns),
                )
            )
            result.memory.CopyFrom(
                api_pb2.MemoryUsage(
                    timestamp=now,
                    working_set_bytes=api_pb2.UInt64Value(value=found.working_set_bytes),
                    usage_bytes=api_pb2.UInt64Value(value=found.memory_bytes),
                    rss_bytes=api_pb2.UInt64Value(value=found.rss_bytes),
                )
            )
        return result

    async def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest
    ) -> api_pb2.ContainerStatsResponse:
        status = self._status("ContainerStatsRequest.container_id", request.container_id)
        return api_pb2.ContainerStatsResponse(stats=self._stats(status))

    async def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest
    ) -> api_pb2.ListContainerStatsResponse:
        f = request.filter
        found = self.service.list_containers(
            pod_id=f.pod_sandbox_id or None, labels=dict(f.label_selector) or None
        )
        return api_pb2.ListContainerStatsResponse(
            stats=[
                self._stats(c)
                for c in found
                if c.id.startswith(f.id) and _matches(c.labels, f.label_selector)
            ]
        )

    # --- exec -------------------------------------------------------------------

    async def ExecSync(self, request: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
        status = self._status("ExecSyncRequest.container_id", request.container_id)
        if not request.cmd:
            raise invalid("ExecSyncRequest.cmd", "must not be empty")
        if request.timeout < 0:
            raise invalid("ExecSyncRequest.timeout", "must not be negative")
        if status.state != State.RUNNING:
            raise CriError(
                grpc.StatusCode.FAILED_PRECONDITION, f"container {status.id} is not running"
            )
        command = list(request.cmd)
        if not command[0].startswith("/"):
            found = shutil.which(command[0], path=DEFAULT_PATH)
            if found is None:
                raise invalid(
                    "ExecSyncRequest.cmd[0]", f"{command[0]}: not found in {DEFAULT_PATH}"
                )
            command[0] = found
        result = await self.service.exec_sync(
            status.id, command, timeout=float(request.timeout) or None
        )
        if result.timed_out:
            raise CriError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"ExecSync {command[0]}: timeout of {request.timeout}s exceeded; killed",
            )
        return api_pb2.ExecSyncResponse(
            stdout=result.stdout[:EXEC_OUTPUT_CAP],
            stderr=result.stderr[:EXEC_OUTPUT_CAP],
            exit_code=result.exit_code,
        )


def _pod_metadata(config: PodConfig) -> api_pb2.PodSandboxMetadata:
    return api_pb2.PodSandboxMetadata(
        name=config.name, uid=config.uid, namespace=config.namespace, attempt=config.attempt
    )
