"""``capvisor up`` and its control commands: ps, status, start, stop, restart, reload, down.

Exit codes (docs/service.md): 0 done; 125 the set file has problems, the
supervisor cannot be reached or refused the request; 1 ``status``: the
program is not running; 2 bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from . import control
from .errors import CapvisorError
from .service import open_service
from .up import Up
from .upfile import load_upfile, socket_path

DEFAULT_FILE = "capvisor.yaml"


def register(commands: Any) -> None:
    """Add ``up``, ``ps``, ``status``, ``start``, ``stop``, ``restart``, ``reload``, ``down``."""
    up = commands.add_parser("up", help="run the programs of a set file under one supervisor")
    up.add_argument(
        "file", nargs="?", default=DEFAULT_FILE, help=f"set file (default {DEFAULT_FILE})"
    )
    up.set_defaults(handler=_up)

    def control_parser(name: str, help: str, *, program: bool = False) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        parser.add_argument(
            "-f",
            "--file",
            default=DEFAULT_FILE,
            help=f"the set file `up` runs (default {DEFAULT_FILE})",
        )
        parser.add_argument("--socket", help="the control socket (default: from the set file)")
        if program:
            parser.add_argument("name", help="the program's name in the set file")
        return parser

    control_parser("ps", "list the programs: state, pid, uptime, restarts, last exit").set_defaults(
        handler=_ps
    )
    status = control_parser("status", "show one program in detail", program=True)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)
    for verb, text in (
        ("start", "start a program (clears a crash loop)"),
        ("stop", "stop a program: its stop signal, then SIGKILL after its timeout"),
        ("restart", "stop, then start a program"),
    ):
        control_parser(verb, text, program=True).set_defaults(handler=_verb, verb=verb)
    control_parser(
        "reload", "re-read the set file: start new, stop removed, restart changed programs"
    ).set_defaults(handler=_reload)
    control_parser("down", "stop every program and the supervisor").set_defaults(handler=_down)


# --- up ----------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"capvisor up: {message}", file=sys.stderr, flush=True)


def _raise_nofile() -> None:
    """Each program costs the supervisor a few fds (pidfd, log pipes and file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _up(args: argparse.Namespace) -> int:
    upfile = load_upfile(args.file)
    _raise_nofile()

    async def main() -> None:
        listener = control.bind(upfile.socket)
        async with trio.open_nursery() as nursery:
            board = None
            if upfile.switchboard:
                board = await _start_switchboard(nursery)
            async with open_service(upfile.state_dir, switchboard=board, on_event=_say) as service:
                if service.cgroups.base is None:
                    _say(f"no cgroup per program: {service.cgroups.reason}")
                up = Up(service, upfile, on_event=_say)
                summary = await up.start()  # start failures: reported by the service
                for line in summary["failed"]:
                    if ": not started: " in line:
                        _say(line)
                await nursery.start(control.serve, listener, up.handle)
                nursery.start_soon(_signals, up, service)
                _say(
                    f"{len(summary['started'])} of {len(upfile.programs)} programs started;"
                    f" control socket {upfile.socket}"
                )
                await up.down.wait()
                _say("stopping every program")
            nursery.cancel_scope.cancel()
        if board is not None:
            board.close()
        upfile.socket.unlink(missing_ok=True)
        _say("down")

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return 0


async def _start_switchboard(nursery: trio.Nursery) -> Any:
    from .switchboard import Broker
    from .switchboard_client import Handle

    broker = Broker()
    await nursery.start(broker.run)
    return Handle(broker.open_handle())


async def _signals(up: Up, service: Any) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
        async for signum in received:
            if signum == signal.SIGHUP:  # reopen every log (after an outside rotation)
                for c in service.list_containers(pod_id=up.pod_id):
                    with contextlib.suppress(CapvisorError):
                        service.reopen_log(c.id)
                continue
            up.down.set()


def _single(group: BaseExceptionGroup) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    return leaf


# --- control commands ---------------------------------------------------------------


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    return socket_path(args.file)


def _call(args: argparse.Namespace, req: dict[str, Any]) -> dict[str, Any]:
    return control.request(_socket(args), req)


def _duration(ns: int) -> str:
    seconds = max(0, ns) // 1_000_000_000
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _last_exit(row: dict[str, Any]) -> str:
    if row["exit_code"] is None:
        return "-"
    return f"{row['exit_code']} {row['reason']}".strip()


def _ps(args: argparse.Namespace) -> int:
    answer = _call(args, {"op": "ps"})
    now = answer["now_ns"]
    header = ("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "CONFINEMENT")
    rows = [header]
    for row in answer["programs"]:
        running = row["state"] == "running"
        rows.append(
            (
                row["name"],
                row["phase"],
                str(row["pid"]) if running else "-",
                _duration(now - row["started_ns"]) if running else "-",
                str(row["restarts"]),
                _last_exit(row),
                row["confinement"] or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _ns(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def _status(args: argparse.Namespace) -> int:
    answer = _call(args, {"op": "status", "name": args.name})
    row = answer["status"]
    if args.json:
        json.dump(row, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        lines = [
            ("name", row["name"]),
            ("state", row["phase"] + (" (crash loop)" if row["failed"] else "")),
            ("pid", str(row["pid"] or "-")),
            ("started", _ns(row["started_ns"])),
            ("finished", _ns(row["finished_ns"])),
            ("restarts", str(row["restarts"])),
            ("last exit", _last_exit(row)),
            ("message", row["message"] or "-"),
            ("next restart", _ns(row["next_restart_ns"])),
            ("log", row["log_path"]),
            ("description", row["description_file"]),
            ("cgroup", row["cgroup"] or "-"),
            ("confinement", row["confinement"] or "-"),
        ]
        for degraded in row.get("report", {}).get("degraded", []):
            lines.append(("degraded", degraded))
        for key, value in lines:
            print(f"{key + ':':14}{value}")
    return 0 if row["state"] == "running" else 1


def _verb(args: argparse.Namespace) -> int:
    answer = _call(args, {"op": args.verb, "name": args.name})
    row = answer["status"]
    print(f"{row['name']}: {row['phase']}" + (f" (pid {row['pid']})" if row["pid"] else ""))
    return 0


def _reload(args: argparse.Namespace) -> int:
    answer = _call(args, {"op": "reload"})
    for key in ("started", "stopped", "restarted"):
        if answer[key]:
            print(f"{key}: {', '.join(answer[key])}")
    for line in answer["failed"]:
        print(f"failed: {line}", file=sys.stderr)
    if not any(answer[k] for k in ("started", "stopped", "restarted", "failed")):
        print("nothing changed")
    return 0 if not answer["failed"] else 125


def _down(args: argparse.Namespace) -> int:
    path = _socket(args)
    pid = control.request(path, {"op": "ping"})["pid"]
    control.request(path, {"op": "down"})
    # Wait until the supervisor has stopped everything and let go of the socket.
    while path.exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return 0


def log_lookup(name: str) -> Path | None:
    """``capvisor logs NAME``: the log file of program NAME of the set file.

    The set file is ``$CAPVISOR_FILE`` or ``capvisor.yaml`` here; it is read,
    not the supervisor asked, so the logs of a stopped set are found too.
    """
    path = Path(os.environ.get("CAPVISOR_FILE", DEFAULT_FILE))
    if not path.exists():
        return None
    upfile = load_upfile(path)
    program = upfile.programs.get(name)
    if program is None:
        return None
    settings = program.description.log
    if settings.path:
        return program.description.directory / settings.path
    return upfile.log_dir / f"{name}.log"
