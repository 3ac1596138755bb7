"""The ``capvisor`` command line.

Exit codes (docs/cli.md):
  0..124   ``run``: the program's own exit code
  125      capvisor failed: bad description or policy, a capability that
           cannot be opened, a confinement layer the kernel lacks, a spawn step
  126      the program exists but cannot be executed
  127      the program does not exist
  128+N    ``run``: the program was killed by signal N
  2        bad command line
  70       an internal error (a bug in capvisor; please report it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .description import load_description
from .errors import EXIT_CAPVISOR, CapvisorError, ProblemsError
from .logs import FdSink
from .process import run_plan
from .resolve import resolve

EXIT_USAGE = 2
EXIT_INTERNAL = 70


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
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="check program descriptions without running them")
    check.add_argument("descriptions", nargs="+", metavar="FILE")
    check.set_defaults(handler=_check)
    return parser


def _run(args: argparse.Namespace) -> int:
    description = load_description(args.description)
    plan = resolve(description)
    if args.report:
        try:
            json.dump(plan.report(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        finally:
            plan.close()
        return 0

    def log_failed(exc: OSError) -> None:
        where = args.log or "standard output"
        print(
            f"capvisor: writing the log to {where} failed: {exc.strerror}; "
            "the program keeps running, its further output is dropped",
            file=sys.stderr,
        )

    try:
        if args.log:
            sink = FdSink.open(args.log, on_error=log_failed)
        else:
            sink = FdSink(os.dup(sys.stdout.fileno()), on_error=log_failed)
    except OSError as exc:
        plan.close()
        raise CapvisorError(f"--log {args.log}: {exc.strerror}") from exc
    try:
        status = trio.run(run_plan, plan, sink)
    finally:
        sink.close()
    return status.shell_code


def _check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.descriptions:
        try:
            load_description(path)
        except ProblemsError as exc:
            failed = True
            print(exc, file=sys.stderr)
    return EXIT_CAPVISOR if failed else 0


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
