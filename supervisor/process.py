"""Supervising a spawned child on trio: wait on its pidfd, stop it, run it.

A :class:`Child` owns a pidfd. Waiting is ``wait_readable(pidfd)`` then a
non-blocking ``waitid(P_PIDFD)``, so no SIGCHLD handler and no thread is
needed. Stopping sends the stop signal to the child's process group (it is a
session leader; its pid cannot be reused while it is unreaped), then SIGKILL
after the timeout, as a shielded deliver-then-wait (STYLE item 7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from . import audit, logs, native, policy, proctree
from .description import StopPolicy
from .resolve import LaunchPlan, LogPipe

#: How long log pipes may stay open after the program exited, for
#: grandchildren still holding them, before the pump stops reading.
DRAIN_GRACE = 2.0


@dataclass(frozen=True)
class ExitStatus:
    """How a child ended: an exit code or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @property
    def shell_code(self) -> int:
        """The code a shell would show: the exit code, or 128 + signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code or 0

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with code {self.code}"


class Child:
    """A running child process, owned through its pidfd."""

    def __init__(self, pid: int, pidfd: int, listener: int = -1) -> None:
        self.pid = pid
        self._pidfd = pidfd
        #: The seccomp notification fd in audit mode (supervisor/audit.py), else -1.
        self.listener = listener
        self.status: ExitStatus | None = None
        self._polling = False  # one task waits on the pidfd, the others park
        self._waiters = trio.lowlevel.ParkingLot()

    @classmethod
    def spawn(cls, plan: LaunchPlan, **options: Any) -> Child:
        """Spawn ``plan`` and close the supervisor's copies of the child's fds.

        ``options`` override fields of the :class:`~supervisor.native.SpawnRequest`
        (the service sets ``cgroup_procs_fd`` and ``parent_death_signal``).
        Raises :class:`~supervisor.errors.SpawnError`; the plan keeps its fds
        (and its log pipes) either way, for the caller to close.
        """
        request = plan.spawn_request()
        if options:
            request = dataclasses.replace(request, **options)
        spawned = native.spawn(request)
        plan.close_child_side()
        return cls(spawned.pid, spawned.pidfd, spawned.listener)

    def _poll(self) -> ExitStatus | None:
        if self.status is None and self._pidfd >= 0:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            if result is not None and result.si_pid != 0:
                if result.si_code == os.CLD_EXITED:
                    self.status = ExitStatus(code=result.si_status)
                else:
                    self.status = ExitStatus(signal=result.si_status)
                self._close_pidfd()
        return self.status

    async def wait(self) -> ExitStatus:
        """Wait until the child exits and reap it; any number of tasks may wait.

        What is left of the child's process group is killed before the child
        is reaped (while its zombie still reserves the group id), so no
        descendant keeps running unobserved in it. Cancellation leaves the
        child running.
        """
        while self.status is None:
            if self._polling:
                await self._waiters.park()
                continue
            self._polling = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self._poll()
            finally:
                self._polling = False
                self._waiters.unpark_all()
        return self.status

    def send_signal(self, sig: int, *, group: bool = True) -> None:
        """Signal the child (and its process group) unless it was already reaped."""
        if self.status is not None or self._pidfd < 0:
            return
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, policy: StopPolicy) -> ExitStatus:
        """Send the stop signal, SIGKILL after ``policy.timeout``; return the status.

        Shielded: a cancelled caller still gets the child killed and reaped.
        """
        with trio.CancelScope(shield=True):
            self.send_signal(policy.signal)
            with trio.move_on_after(policy.timeout):
                return await self.wait()
            self.send_signal(signal.SIGKILL)
            return await self.wait()

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Forget the child without waiting (kills it first if it still runs)."""
        if self.status is None and self._pidfd >= 0:
            self.send_signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        self._close_pidfd()
        listener, self.listener = self.listener, -1
        if listener >= 0:
            os.close(listener)


async def run_plan(
    plan: LaunchPlan,
    sink: logs.LogSink,
    *,
    stop_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    on_started: Callable[[Child], None] | None = None,
    drain_grace: float = DRAIN_GRACE,
    spawn_options: Mapping[str, Any] | None = None,
) -> ExitStatus:
    """Spawn ``plan``, pump its logs into ``sink`` and wait for it to exit.

    A signal in ``stop_signals`` delivered to the supervisor stops the child
    with its description's stop policy. Every byte the child wrote to its
    ``!log`` pipes is in ``sink`` before this returns. The plan is closed.
    ``spawn_options`` go to :meth:`Child.spawn`.
    """
    plan.audit = plan.audit or plan.description.audit  # answered by _audit below
    try:
        child = Child.spawn(plan, **(spawn_options or {}))
    except BaseException:
        plan.close()
        raise
    pipes = plan.take_log_pipes()
    try:
        async with trio.open_nursery() as nursery:
            pumps = trio.CancelScope()
            nursery.start_soon(_pump_all, pipes, sink, pumps)
            pipes = []
            auditing = trio.CancelScope()
            if child.listener >= 0 and plan.compiled_policy is not None:
                nursery.start_soon(_audit, child.listener, plan.compiled_policy, sink, auditing)
            if on_started is not None:
                on_started(child)
            watcher = trio.CancelScope()
            if stop_signals:
                stop = plan.description.stop
                await nursery.start(_stop_on_signal, child, stop_signals, stop, watcher)
            status = await child.wait()
            watcher.cancel()
            # Grandchildren may still hold the pipes: drain for a bounded time.
            pumps.deadline = trio.current_time() + drain_grace
            auditing.deadline = pumps.deadline
    finally:
        for pipe in pipes:
            os.close(pipe.read_fd)
        child.close()
        plan.close()
    return status


async def _pump_all(pipes: list[LogPipe], sink: logs.LogSink, scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for pipe in pipes:
                nursery.start_soon(logs.pump, pipe.read_fd, pipe.stream, sink)


async def _audit(
    listener: int, compiled: policy.CompiledPolicy, sink: logs.LogSink, scope: trio.CancelScope
) -> None:
    """Report denied calls in the log, as CRI records on stderr (audit.py)."""
    with scope:
        await audit.serve(listener, compiled, lambda text: sink.write(audit.log_record(text)))


async def _stop_on_signal(
    child: Child,
    signals: Sequence[int],
    policy: StopPolicy,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stop ``child`` with ``policy`` at the first of ``signals``; until cancelled."""
    with scope, trio.open_signal_receiver(*signals) as received:
        task_status.started()
        async for _ in received:
            await child.stop(policy)
            return


@asynccontextmanager
async def orphans_reaped_then_killed(known: set[int]) -> AsyncIterator[None]:
    """Adopt the program's orphaned descendants while open; kill what is left at exit.

    For a supervisor of one program (``capvisor run``): this process becomes
    the child subreaper, so a descendant that left the program's session
    (a double-forked daemon) is reparented here instead of to init. Those
    are reaped as they die; on leaving, every one still alive is SIGKILLed
    and reaped, so none outlives the supervision unobserved. ``known`` are
    the children someone else waits for (the program itself); it may change
    while open. The service runs the same :func:`reap_adopted` and records
    the live strays instead (service.py).
    """
    was_subreaper = proctree.set_child_subreaper(True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reap_adopted, lambda: known)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        for _ in range(_KILL_ROUNDS):  # a killed stray's own children come to us next
            _, alive = proctree.reap_strays(known)
            if not alive:
                break
            proctree.kill_all(alive, signal.SIGKILL)
            for pid in alive:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        proctree.set_child_subreaper(was_subreaper)


#: Bound on kill-and-reap rounds for strays that were forking as they died.
_KILL_ROUNDS = 16


async def reap_adopted(
    known: Callable[[], set[int]],
    on_scan: Callable[[list[int], list[int]], None] | None = None,
) -> None:
    """As the child subreaper: reap adopted orphans as they die, until cancelled.

    Scans after each burst of SIGCHLD, and every :data:`REAP_INTERVAL`
    seconds in any case; ``known()`` are the children someone else waits
    for. ``on_scan(reaped, alive)`` sees each scan's result (the service
    records the live strays).
    """
    with trio.open_signal_receiver(signal.SIGCHLD) as received:
        while True:
            with trio.move_on_after(REAP_INTERVAL):
                await received.__anext__()
                await trio.sleep(0.05)  # one scan for a burst of exits
            reaped, alive = proctree.reap_strays(known())
            if on_scan is not None:
                on_scan(reaped, alive)


#: How often adopted orphans are looked for when no SIGCHLD came, seconds.
REAP_INTERVAL = 2.0
