"""The ``capvisor`` command line.

Exit codes (docs/cli.md):
  0..124   ``run``: the program's own exit code
  125      capvisor failed: bad description or policy, a capability that
           cannot be opened, a confinement layer the kernel lacks, a spawn step
  126      the program exists but cannot be executed
  127      the program does not exist
  128+N    ``run``: the program was killed by signal N
  2        bad command line
  141      the reader of capvisor's standard output went away (``| head``)
  70       an internal error (a bug in capvisor; please report it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .cli_service import log_lookup
from .cli_service import register as register_service
from .cri.cli import register as register_cri
from .description import load_description
from .errors import EXIT_CAPVISOR, CapvisorError, ConfinementError, ProblemsError
from .logfile import FdSink, LogEvent, LogFile, reopen_on_signals
from .logs_cli import register as register_logs
from .policy_cli import register as register_policy
from .process import orphans_reaped_then_killed, run_plan
from .resolve import resolve
from .switchboard_cli import register as register_switchboard
from .switchboard_cli import root_handle as switchboard_handle

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, like other filters


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capvisor",
        description="Run programs with exactly the capabilities their description grants.",
    )
    parser.add_argument("--version", action="version", version=f"capvisor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one program from its description")
    run.add_argument("description", help="the program description (YAML)")
    run.add_argument(
        "--log",
        metavar="FILE",
        help="append CRI-format log records to FILE (default: capvisor's standard output)",
    )
    run.add_argument(
        "--report",
        action="store_true",
        help="print the effective confinement as JSON and exit without running",
    )
    run.add_argument(
        "--switchboard",
        metavar="PATH",
        help="resolve !server, !client and !connect with the broker whose root socket is PATH",
    )
    run.add_argument(
        "--audit",
        action="store_true",
        help="report every syscall the policy denies in the program's log (docs/policies.md)",
    )
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="check program descriptions without running them")
    check.add_argument("descriptions", nargs="+", metavar="FILE")
    check.set_defaults(handler=_check)
    register_logs(commands, lookup=log_lookup)
    register_service(commands)
    register_switchboard(commands)
    register_cri(commands)
    register_policy(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    description = load_description(args.description)
    if args.switchboard:
        with switchboard_handle(args.switchboard) as board:
            plan = resolve(description, switchboard=board)
    else:
        plan = resolve(description)
    plan.audit = plan.audit or args.audit
    for key in description.cgroup_limits:  # fail closed, like a missing kernel layer
        missing = f"limits.{key}: not applied: `run` makes no cgroup (`up` does)"
        if description.degrade != "allow":
            plan.close()
            raise ConfinementError(
                f"{description.at('limits')}: {missing}; set `degrade: allow` to run without it"
            )
        plan.degraded.append(missing)
        if not args.report:
            print(f"capvisor: {missing}", file=sys.stderr)
    if args.report:
        try:
            json.dump(plan.report(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        finally:
            plan.close()
        return 0

    def log_event(event: LogEvent) -> None:
        if event.kind != "rotated":
            print(f"capvisor: {event}", file=sys.stderr, flush=True)

    settings = plan.description.log
    path = args.log or (str(plan.description.directory / settings.path) if settings.path else None)
    sink: FdSink
    try:
        if path:
            sink = LogFile(
                path,
                max_size=settings.max_size,
                max_files=settings.max_files,
                on_event=log_event,
            )
        else:
            sink = FdSink(os.dup(sys.stdout.fileno()), on_event=log_event)
    except OSError as exc:
        plan.close()
        where = f"--log {args.log}" if args.log else f"{plan.description.at('log')}: log {path}"
        raise CapvisorError(f"{where}: {exc.strerror}") from exc

    async def supervise() -> int:
        program: set[int] = set()  # its exit is waited for by run_plan, not reaped as a stray
        async with orphans_reaped_then_killed(program), contextlib.AsyncExitStack() as stack:
            if isinstance(sink, LogFile):  # SIGHUP: reopen the log (after rotation by others)
                await stack.enter_async_context(reopen_on_signals(sink))
            status = await run_plan(plan, sink, on_started=lambda child: program.add(child.pid))
            return status.shell_code

    try:
        return trio.run(supervise)
    finally:
        sink.close()


def _check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.descriptions:
        try:
            load_description(path)
        except ProblemsError as exc:
            failed = True
            print(exc, file=sys.stderr)
    return EXIT_CAPVISOR if failed else 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``capvisor`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ProblemsError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except CapvisorError as exc:
        print(f"capvisor: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `capvisor … | head`: the reader left; say nothing, like cat
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: one line, not a traceback, unless asked for
        if os.environ.get("CAPVISOR_DEBUG"):
            raise
        print(
            f"capvisor: internal error: {type(exc).__name__}: {exc} "
            "(set CAPVISOR_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
