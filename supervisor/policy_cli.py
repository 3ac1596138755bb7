"""``capvisor policy …``: check, show, compile, import, diff and learn policies.

Exit codes (docs/cli.md): 0 success (``diff``: no difference); 1 ``diff``
found differences; 125 a policy has problems (each printed as
FILE:LINE:COL: message) or a program cannot be learned; 2 bad command line.
``learn`` exits with the program's own status once the draft is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import policy_learn, policy_oci, policy_show
from .errors import EXIT_CAPVISOR, CapvisorError, PolicyError
from .policy import compile_policy, load_policy

__all__ = ["register"]


def register(commands: Any) -> None:
    """Add ``policy`` and its subcommands to the ``capvisor`` subparsers."""
    parser = commands.add_parser("policy", help="check, show, compile, import and learn policies")
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    check = sub.add_parser("check", help="validate and lint policy files")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(handler=_check)

    show = sub.add_parser("show", help="the expanded table: syscall, action, conditions, origin")
    show.add_argument("policy", metavar="NAME|FILE")
    show.add_argument("--overridden", action="store_true", help="also list entries that lost")
    show.add_argument("--json", action="store_true", help="print the rows as JSON")
    show.set_defaults(handler=_show)

    comp = sub.add_parser("compile", help="compile to BPF, libseccomp PFC or OCI JSON")
    comp.add_argument("policy", metavar="NAME|FILE")
    comp.add_argument("--format", choices=("bpf", "pfc", "oci"), default="pfc")
    comp.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    comp.set_defaults(handler=_compile)

    imp = sub.add_parser("import", help="OCI/Docker seccomp JSON to a capvisor policy")
    imp.add_argument("file", metavar="FILE.json")
    imp.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    imp.set_defaults(handler=_import)

    dif = sub.add_parser("diff", help="what changes from policy A to policy B")
    dif.add_argument("a", metavar="A")
    dif.add_argument("b", metavar="B")
    dif.set_defaults(handler=_diff)

    learn = sub.add_parser(
        "learn",
        help="run a program under a recording filter and write a draft policy",
        usage="capvisor policy learn [--merge FILE] [-o OUT] -- CMD [ARGS...]",
    )
    learn.add_argument(
        "--merge",
        metavar="FILE",
        action="append",
        default=[],
        help="merge an earlier draft (repeatable)",
    )
    learn.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    learn.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    learn.set_defaults(handler=_learn)


def _write(data: str | bytes, output: str | None) -> None:
    if output is None:
        if isinstance(data, bytes):
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            sys.stdout.write(data)
        return
    try:
        Path(output).write_bytes(data if isinstance(data, bytes) else data.encode())
    except OSError as exc:
        raise CapvisorError(f"-o {output}: {exc.strerror}") from exc


def _check(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        try:
            compile_policy(load_policy(name))
        except PolicyError as exc:
            failed = True
            print(exc, file=sys.stderr)
    return EXIT_CAPVISOR if failed else 0


def _show(args: argparse.Namespace) -> int:
    rows = policy_show.table(load_policy(args.policy), overridden=args.overridden)
    if args.json:
        json.dump([row.__dict__ for row in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(policy_show.render(rows))
    return 0


def _compile(args: argparse.Namespace) -> int:
    loaded = load_policy(args.policy)
    if args.format == "oci":
        _write(json.dumps(policy_oci.export_oci(loaded), indent=2) + "\n", args.output)
        return 0
    compiled = compile_policy(loaded)
    if args.format == "bpf":
        if args.output is None and sys.stdout.isatty():
            raise CapvisorError("compile --format bpf writes binary: use -o OUT or a pipe")
        _write(compiled.bpf, args.output)
    else:
        _write(compiled.pfc(), args.output)
    return 0


def _import(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise CapvisorError(f"{args.file}: {exc.strerror}") from exc
    imported = policy_oci.import_oci(text, args.file)
    for line in imported.reported:
        print(f"capvisor: {args.file}: {line}", file=sys.stderr)
    _write(imported.yaml, args.output)
    return 0


def _diff(args: argparse.Namespace) -> int:
    a = policy_show.table(load_policy(args.a))
    b = policy_show.table(load_policy(args.b))
    lines = policy_show.diff(a, b)
    for line in lines:
        print(line)
    return 1 if lines else 0


def _learn(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CapvisorError("learn: no command given (capvisor policy learn -- CMD ARGS...)")
    recording = policy_learn.Recording()
    for name in args.merge:
        recording.absorb(load_policy(name))
    learned = policy_learn.learn(command, recording=recording)
    _write(recording.draft(command), args.output)
    if args.output:
        print(
            f"capvisor: wrote {args.output} ({sum(recording.calls.values())} calls, "
            f"{len(recording.calls)} syscalls; program exited {learned.returncode})",
            file=sys.stderr,
        )
    return learned.returncode
