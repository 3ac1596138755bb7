"""OCI runtime-spec / Docker seccomp JSON: export a policy, import a profile.

:func:`export_oci` writes the ``linux.seccomp`` object of the OCI runtime
spec, which is also what ``docker``/``podman --security-opt seccomp=FILE``
read: the default action, the native architecture, and one entry per
emitted rule (unconditional allows grouped, errno rules grouped by errno,
each conditional rule with its ``SCMP_CMP_MASKED_EQ`` arguments: the mask
keeps the comparison on the low 32 bits, as in our own filter).

:func:`import_oci` turns such a profile into our YAML. Whatever cannot be
carried over is *reported*, never silently dropped: entries gated on a
capability (``includes.caps``: capvisor grants no capabilities), entries for
other architectures, names libseccomp does not know here, comparisons our
language cannot express (``SCMP_CMP_NE``, ``LT``, ...), per-syscall actions
other than allow and errno, and allows of always-denied syscalls.
"""

from __future__ import annotations

import errno as errno_module
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Location, PolicyError, Problem, errno_name
from .policy import _NR_ERROR, ALLOW, MASK32, MASK64, Policy, syscall_number
from .syscall_groups import ALWAYS_DENIED

__all__ = ["Imported", "export_oci", "import_oci"]

_NATIVE_OCI_ARCH = "SCMP_ARCH_X86_64"
#: Names Docker's ``includes.arches``/``excludes.arches`` use for this machine.
_NATIVE_ARCH_NAMES = frozenset({"amd64", "x86_64", "SCMP_ARCH_X86_64"})


def export_oci(policy: Policy) -> dict[str, Any]:
    """The OCI seccomp object for ``policy``.

    Raises :class:`PolicyError` when the policy needs capvisor's argument
    guard (an unconditional ``ioctl`` or ``personality``): OCI profiles have
    no equivalent that keeps the 32-bit semantics, so write those syscalls
    with ``allow_if``.
    """
    if policy.guards():
        names = ", ".join(sorted(policy.guards()))
        raise PolicyError.single(
            None,
            f"{policy.source}: cannot export to OCI: {names} allowed unconditionally needs "
            "capvisor's argument guard (TIOCSTI, personalities); allow it with allow_if",
        )
    profile: dict[str, Any] = {"defaultAction": _action(policy.default.kind)}
    if policy.default.kind == "errno":
        profile["defaultErrnoRet"] = policy.default.errno
    profile["architectures"] = [_NATIVE_OCI_ARCH]
    plain: list[str] = []
    errnos: dict[int, list[str]] = {}
    conditional: list[dict[str, Any]] = []
    for rule in policy.rules:
        if rule.action == policy.default:
            # A deny equal to the default changes nothing in the filter but
            # documents a decision: keep it (import reads it back as deny).
            if rule.origin.section == "deny":
                errnos.setdefault(rule.action.errno, []).append(rule.syscall)
            continue
        if rule.checks:
            args = [
                {"index": c.arg, "value": c.mask, "valueTwo": c.value, "op": "SCMP_CMP_MASKED_EQ"}
                for c in rule.checks
            ]
            conditional.append({"names": [rule.syscall], "action": "SCMP_ACT_ALLOW", "args": args})
        elif rule.action == ALLOW:
            plain.append(rule.syscall)
        else:
            errnos.setdefault(rule.action.errno, []).append(rule.syscall)
    syscalls: list[dict[str, Any]] = []
    if plain:
        syscalls.append({"names": plain, "action": "SCMP_ACT_ALLOW"})
    syscalls += conditional
    for number, names in sorted(errnos.items()):
        syscalls.append({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": number})
    profile["syscalls"] = syscalls
    return profile


def _action(kind: str) -> str:
    return {"errno": "SCMP_ACT_ERRNO", "kill": "SCMP_ACT_KILL_PROCESS", "log": "SCMP_ACT_LOG"}[kind]


# ---------------------------------------------------------------------------
# Import.


@dataclass
class Imported:
    """The result of :func:`import_oci`: our YAML and what was not carried over."""

    yaml: str
    reported: list[str] = field(default_factory=list)


@dataclass
class _Draft:
    default: str = "EPERM"
    allow: list[str] = field(default_factory=list)
    allow_if: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errno: dict[str, str] = field(default_factory=dict)
    deny: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)


class _Importer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.draft = _Draft()
        self.problems: list[Problem] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(Problem(None, f"{self.path}: {where}: {message}"))

    def note(self, where: str, message: str) -> None:
        self.draft.reported.append(f"{where}: {message}")

    def read(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            self.fail("(top level)", "an OCI seccomp profile is a JSON object")
            return
        self.default(doc)
        arches = set(doc.get("architectures") or ())
        arches |= {a.get("architecture") for a in doc.get("archMap") or () if isinstance(a, dict)}
        if arches - {_NATIVE_OCI_ARCH}:
            self.note(
                "architectures",
                f"ignored {', '.join(sorted(map(str, arches - {_NATIVE_OCI_ARCH})))}: capvisor "
                "filters the native architecture and kills calls from any other",
            )
        for key in ("flags", "listenerPath", "listenerMetadata"):
            if key in doc:
                self.note(key, "ignored: not part of a capvisor policy")
        syscalls = doc.get("syscalls", [])
        if not isinstance(syscalls, list):
            self.fail("syscalls", "must be a list")
            return
        for i, entry in enumerate(syscalls):
            self.entry(f"syscalls[{i}]", entry)

    def default(self, doc: dict[str, Any]) -> None:
        action = doc.get("defaultAction")
        if action == "SCMP_ACT_ERRNO":
            number = doc.get("defaultErrnoRet", errno_module.EPERM)
            if not isinstance(number, int) or not 0 < number < 4096:
                self.fail("defaultErrnoRet", f"not an errno: {number!r}")
                return
            self.draft.default = errno_name(number)
        elif action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD"):
            self.draft.default = "kill"
        elif action == "SCMP_ACT_LOG":
            self.draft.default = "log"
        elif action in ("SCMP_ACT_TRAP", "SCMP_ACT_TRACE"):
            self.draft.default = "EPERM"
            self.note("defaultAction", f"{action} is not supported; the default is EPERM")
        elif action == "SCMP_ACT_ALLOW":
            self.fail("defaultAction", "SCMP_ACT_ALLOW: a capvisor policy is an allow-list")
        else:
            self.fail("defaultAction", f"unknown or missing action {action!r}")

    def entry(self, where: str, entry: Any) -> None:
        if not isinstance(entry, dict):
            self.fail(where, "an entry is an object with names and action")
            return
        names = entry.get("names", [entry["name"]] if "name" in entry else None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.fail(f"{where}.names", "must be a list of syscall names")
            return
        shown = ", ".join(names)
        includes, excludes = entry.get("includes") or {}, entry.get("excludes") or {}
        if includes.get("caps"):
            caps = ", ".join(includes["caps"])
            self.note(where, f"not imported, needs {caps} (capvisor grants none): {shown}")
            return
        arches = includes.get("arches")
        if arches and not _NATIVE_ARCH_NAMES & set(arches):
            self.note(where, f"not imported, only for {', '.join(arches)}: {shown}")
            return
        if _NATIVE_ARCH_NAMES & set(excludes.get("arches") or ()):
            self.note(where, f"not imported, excluded on this architecture: {shown}")
            return
        known = list(self.known(where, names))
        action = entry.get("action")
        if action == "SCMP_ACT_ALLOW":
            self.allow(where, known, entry.get("args") or [])
        elif action == "SCMP_ACT_ERRNO":
            number = entry.get("errnoRet", errno_module.EPERM)
            if not isinstance(number, int) or not 0 < number < 4096:
                self.fail(f"{where}.errnoRet", f"not an errno: {number!r}")
                return
            if errno_name(number) == self.draft.default:
                self.draft.deny += known  # the same as the default: a deny
                return
            for name in known:
                self.draft.errno[name] = errno_name(number)
        elif action in (
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_TRAP",
        ):
            self.draft.deny += known
            self.note(where, f"{action} per syscall is not supported; denied instead: {shown}")
        else:
            self.note(where, f"not imported, action {action!r} is not supported: {shown}")

    def known(self, where: str, names: list[str]) -> Iterator[str]:
        foreign = []
        for name in names:
            number = syscall_number(name)
            if number >= 0:
                yield name
            elif number == _NR_ERROR:
                self.note(where, f"not imported, unknown to libseccomp: {name}")
            else:
                foreign.append(name)
        if foreign:
            self.note(where, f"skipped, not syscalls on this architecture: {', '.join(foreign)}")

    def allow(self, where: str, names: list[str], args: Any) -> None:
        denied = [n for n in names if ALWAYS_DENIED.get(n, 0) is None]
        if denied:
            self.note(where, f"not imported, always denied by capvisor: {', '.join(denied)}")
        names = [n for n in names if n not in denied]
        if not args:
            self.draft.allow += names
            return
        condition = self.condition(where, args)
        if condition is None:
            self.note(where, f"not imported, left to the default: {', '.join(names)}")
            return
        for name in names:
            self.draft.allow_if.setdefault(name, []).append(condition)

    def condition(self, where: str, args: Any) -> dict[str, Any] | None:
        if not isinstance(args, list):
            self.fail(f"{where}.args", "must be a list")
            return None
        out: dict[str, Any] = {}
        for j, arg in enumerate(args):
            at = f"{where}.args[{j}]"
            if not isinstance(arg, dict) or not isinstance(arg.get("index"), int):
                self.fail(at, "an argument is an object with index, value, op")
                return None
            index, value, two = arg["index"], arg.get("value", 0), arg.get("valueTwo", 0)
            op = arg.get("op")
            key = f"arg{index}"
            if not 0 <= index <= 5 or key in out:
                self.note(at, f"index {index} is out of range or repeated")
                return None
            if op == "SCMP_CMP_MASKED_EQ" and value == MASK64 and two == 0:
                out[key] = "null_pointer"
            elif op == "SCMP_CMP_EQ" and 0 <= value <= MASK32:
                out[key] = {"eq": value}
            elif op == "SCMP_CMP_MASKED_EQ" and 0 <= value <= MASK32 and 0 <= two <= MASK32:
                if two & ~value:
                    self.note(at, "masked value has bits outside the mask: never holds")
                    return None
                out[key] = {"none_of_mask": [value]} if two == 0 else {"eq": two, "mask": value}
            else:
                self.note(
                    at,
                    f"{op} {value:#x} cannot be expressed (capvisor compares the low 32 bits "
                    "for equality under a mask)",
                )
                return None
        return out

    def finish(self) -> None:
        """Settle conflicts the loader would refuse."""
        both = sorted(set(self.draft.allow) & set(self.draft.allow_if))
        for name in both:
            del self.draft.allow_if[name]
            self.note(
                "(merged)",
                f"{name} allowed unconditionally and with conditions: kept the unconditional allow",
            )


def import_oci(text: str, path: str) -> Imported:
    """Translate an OCI/Docker seccomp profile (JSON ``text`` read from
    ``path``) to a capvisor policy.

    Raises :class:`PolicyError` for invalid JSON (with its line and column)
    or a malformed profile (naming the field, ``syscalls[3].args[0]``).
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError.single(Location(path, exc.lineno, exc.colno), exc.msg) from exc
    importer = _Importer(path)
    importer.read(doc)
    if importer.problems:
        raise PolicyError(importer.problems)
    importer.finish()
    return Imported(_yaml(importer.draft, path), importer.draft.reported)


def _yaml(draft: _Draft, path: str) -> str:
    lines = [f"# Imported from {Path(path).name} by capvisor policy import."]
    if draft.reported:
        lines.append("# Not carried over (see docs/policies.md, Import):")
        lines += [f"#   {r}" for r in draft.reported]
    lines += ["version: 1", f"default: {draft.default}"]
    if draft.allow:
        lines.append("allow:")
        lines += [f"  - {name}" for name in sorted(dict.fromkeys(draft.allow))]
    if draft.allow_if:
        lines.append("allow_if:")
        for name in sorted(draft.allow_if):
            lines.append(f"  {name}:")
            for alternative in _dedupe(draft.allow_if[name]):
                lines.append(f"    - {_flow(alternative)}")
    if draft.deny:
        lines.append("deny:")
        lines += [f"  - {name}" for name in sorted(dict.fromkeys(draft.deny))]
    if draft.errno:
        lines.append("errno:")
        lines += [f"  {name}: {number}" for name, number in sorted(draft.errno.items())]
    return "\n".join(lines) + "\n"


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(json.dumps(item, sort_keys=True), item)
    return list(seen.values())


def _flow(value: Any) -> str:
    """A YAML flow rendering of nested dicts, lists and ints (hex above 9)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return hex(value) if isinstance(value, int) and value > 9 else str(value)
