"""``capvisor up``: a set file applied to the service, and the control requests.

:class:`Up` owns one pod (named after the set file) in a
:class:`~supervisor.service.Service` and makes its containers match the set
file: at start every program is created and started in ``after`` order;
``reload`` starts new programs, stops removed ones and restarts changed ones
(a program is changed when its description text or file changed).
:meth:`Up.handle` answers control requests (supervisor/control.py).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from .errors import CapvisorError, DescriptionError
from .service import (
    AlreadyExistsError,
    ContainerConfig,
    ContainerStatus,
    NotFoundError,
    PodConfig,
    Service,
    State,
)
from .upfile import UpFile, UpProgram, load_upfile

#: Label on every container ``up`` made: the program's name in the set file.
PROGRAM_LABEL = "capvisor.dev/program"


class Up:
    """The programs of one set file, run by ``service``."""

    def __init__(
        self, service: Service, upfile: UpFile, on_event: Callable[[str], None] | None = None
    ) -> None:
        self.service = service
        self.upfile = upfile
        self.pod_id = ""
        self.down = trio.Event()
        self._on_event = on_event or (lambda message: None)
        self._lock = trio.Lock()  # one apply/reload at a time

    def _config(self, program: UpProgram) -> ContainerConfig:
        settings = program.description.log
        log_path = (
            str(program.description.directory / settings.path)
            if settings.path
            else str(self.upfile.log_dir / f"{program.name}.log")
        )
        return ContainerConfig(
            name=program.name,
            description_text=program.text,
            description_file=program.file,
            labels={PROGRAM_LABEL: program.name},
            log_path=log_path,
        )

    async def start(self) -> dict[str, list[str]]:
        """Create the pod and start every program that is not running, in order."""
        async with self._lock:
            self.pod_id = await self.service.create_pod(
                PodConfig(name=self.upfile.path.stem, log_directory=str(self.upfile.log_dir))
            )
            return await self._apply(self.upfile, start_all=True)

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the set file and apply the differences; nothing changes if it has problems."""
        async with self._lock:
            upfile = load_upfile(self.upfile.path)  # DescriptionError: nothing changed
            summary = await self._apply(upfile, start_all=False)
            self.upfile = upfile
            return summary

    async def _apply(self, upfile: UpFile, *, start_all: bool) -> dict[str, list[str]]:
        summary: dict[str, list[str]] = {
            "started": [],
            "stopped": [],
            "restarted": [],
            "failed": [],
        }
        current = {c.name: c for c in self.service.list_containers(pod_id=self.pod_id)}
        for name, old in current.items():
            if name not in upfile.programs:
                await self.service.remove_container(old.id)
                summary["stopped"].append(name)
        failed: set[str] = set()
        for name, program in upfile.programs.items():
            config = self._config(program)
            changed = False
            try:
                cid = await self.service.create_container(
                    self.pod_id, config, description=program.description
                )
            except AlreadyExistsError:
                changed = True
                await self.service.remove_container(current[name].id)
                cid = await self.service.create_container(
                    self.pod_id, config, description=program.description
                )
            status = self.service.container_status(cid)
            new = name not in current
            if not (start_all or new or changed) or status.state is State.RUNNING:
                continue
            blocked = [dep for dep in program.after if dep in failed]
            if blocked:
                failed.add(name)
                summary["failed"].append(f"{name}: not started: {', '.join(blocked)} did not start")
                continue
            try:
                await self.service.start_container(cid)
            except CapvisorError as exc:
                failed.add(name)
                summary["failed"].append(f"{name}: {exc}")  # the service said so already
                continue
            summary["restarted" if changed else "started"].append(name)
        return summary

    def _find(self, name: Any) -> ContainerStatus:
        if not isinstance(name, str):
            raise CapvisorError("the request needs a program 'name'")
        try:
            return self.service.find_container(name, self.pod_id)
        except NotFoundError:
            known = ", ".join(c.name for c in self.service.list_containers(pod_id=self.pod_id))
            raise CapvisorError(f"no program {name!r} (programs: {known})") from None

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (see supervisor/control.py)."""
        op = req["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "file": str(self.upfile.path)}
        if op == "ps":
            rows = [status_json(c) for c in self.service.list_containers(pod_id=self.pod_id)]
            return {"ok": True, "programs": rows, "now_ns": time.time_ns()}
        if op == "status":
            found = self._find(req.get("name"))
            full = self.service.container_status(found.id)
            return {"ok": True, "status": status_json(full, report=True), "now_ns": time.time_ns()}
        if op in ("start", "stop", "restart"):
            found = self._find(req.get("name"))
            if op == "start":
                await self.service.start_container(found.id)
            elif op == "stop":
                await self.service.stop_container(found.id)
            else:
                await self.service.restart_container(found.id)
            return {"ok": True, "status": status_json(self.service.container_status(found.id))}
        if op == "reload":
            try:
                summary = await self.reload()
            except DescriptionError as exc:
                return {"ok": False, "error": f"reload refused, nothing changed:\n{exc}"}
            return {"ok": True, **summary}
        if op == "down":
            self.down.set()
            return {"ok": True}
        if op == "logs":
            found = self._find(req.get("name"))
            return {"ok": True, "path": found.log_path}
        raise CapvisorError(f"unknown request {op!r}")


def status_json(status: ContainerStatus, *, report: bool = False) -> dict[str, Any]:
    """A status as JSON-able data (``capvisor status --json``)."""
    data = dataclasses.asdict(status)
    if not report:
        data.pop("report")
    for key, value in data.items():
        if isinstance(value, enum.Enum):
            data[key] = value.value
    return data
