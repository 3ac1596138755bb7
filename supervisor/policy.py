"""Seccomp policies: YAML allow-lists → a BPF program for the native architecture.

The language is documented in ``docs/policies.md``. Three verbs:

- :func:`load_policy` reads a policy file and its includes, checks all of
  them (every problem is collected with its file, line and column and raised
  together as one :class:`~supervisor.errors.PolicyError`), expands groups
  and settles precedence into a :class:`Policy`: one :class:`Rule` per
  syscall and alternative, each with its :class:`Origin`.
- :func:`compile_policy` turns a :class:`Policy` into a
  :class:`CompiledPolicy` (BPF bytes, digest) with libseccomp.
- :func:`compiled` does both, cached by the files' modification times.

The compiled program is a short *guard* followed by libseccomp's filter.
The guard kills a foreign architecture and denies the argument values of
:data:`~supervisor.syscall_groups.ALWAYS_DENIED` (TIOCSTI, odd
personalities) before libseccomp's rules run: libseccomp cannot express
"allow ioctl except these commands" (an unconditional rule absorbs every
conditional rule of the same syscall, and there is no masked not-equal).
Every argument comparison looks at the argument's low 32 bits, as the
kernel does for ``int`` arguments; only ``null_pointer`` compares all 64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_module
import hashlib
import itertools
import os
import re
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyseccomp
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from .errors import Location, PolicyError, Problem, errno_name
from .syscall_groups import ALWAYS_DENIED, CONSTANTS, GROUPS, ArgGuard, expand
from .yamlsrc import Source, load_yaml, read_text, suggest

__all__ = [
    "ALWAYS_DENIED",
    "MASK32",
    "MASK64",
    "NATIVE_ARCH",
    "POLICIES_DIR",
    "POLICY_PATH_ENV",
    "Action",
    "ArgCheck",
    "CompiledPolicy",
    "Origin",
    "Policy",
    "Rule",
    "clear_cache",
    "compile_policy",
    "compiled",
    "export_pfc",
    "find_policy",
    "load_policy",
    "syscall_number",
]

#: The policies shipped with capvisor.
POLICIES_DIR: Path = Path(__file__).resolve().parent.parent / "policies"
#: Colon-separated directories searched for policy names before POLICIES_DIR.
POLICY_PATH_ENV = "CAPVISOR_POLICY_PATH"

TOP_LEVEL_KEYS = ("version", "include", "default", "allow", "allow_if", "deny", "errno")
LANGUAGE_VERSION = 1
ARG_KEYS = tuple(f"arg{i}" for i in range(6))
_CONDITION_KEYS = "any_of, none_of_mask, eq (mask only with eq)"
MASK32 = 0xFFFFFFFF
#: The one 64-bit comparison: ``null_pointer`` (a NULL pointer argument, all bits zero).
MASK64 = 0xFFFFFFFFFFFFFFFF
_SUFFIXES = (".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

Section = Literal["allow", "allow_if", "deny", "errno", "always denied"]


# ---------------------------------------------------------------------------
# Syscall names, through libseccomp.

_lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
_lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
_lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int

#: libseccomp's token (the AUDIT_ARCH value) of the architecture we run on.
NATIVE_ARCH: int = pyseccomp.system_arch()
_NATIVE_ARCH_NAME = {pyseccomp.Arch.X86_64: "x86_64", pyseccomp.Arch.AARCH64: "aarch64"}.get(
    NATIVE_ARCH, f"arch {NATIVE_ARCH:#x}"
)
_NR_ERROR = -1  # libseccomp's __NR_SCMP_ERROR: a name it does not know at all


def syscall_number(name: str) -> int:
    """The native number of ``name``; -1 when unknown to libseccomp, and a
    negative pseudo number below -1 when it exists only on other architectures."""
    return int(_lib.seccomp_syscall_resolve_name_arch(NATIVE_ARCH, name.encode()))


def _native_names() -> list[str]:
    names = []
    for number in range(1024):
        try:
            names.append(pyseccomp.resolve_syscall(NATIVE_ARCH, number).decode())
        except ValueError:
            continue
    return names


_KNOWN_NATIVE: list[str] = _native_names()


# ---------------------------------------------------------------------------
# The policy model.


@dataclass(frozen=True)
class Action:
    """What the filter does with a call: ``allow``, ``errno`` (with its number),
    ``kill`` (the whole process) or ``log`` (allow and log)."""

    kind: Literal["allow", "errno", "kill", "log"]
    errno: int = 0

    def __str__(self) -> str:
        return errno_name(self.errno) if self.kind == "errno" else self.kind

    @property
    def seccomp(self) -> int:
        """The SECCOMP_RET_* value."""
        if self.kind == "errno":
            return int(pyseccomp.ERRNO(self.errno))
        actions = {"allow": pyseccomp.ALLOW, "kill": pyseccomp.KILL_PROCESS, "log": pyseccomp.LOG}
        return int(actions[self.kind])


ALLOW = Action("allow")
EPERM = Action("errno", errno_module.EPERM)


@dataclass(frozen=True, order=True)
class ArgCheck:
    """``(arg & mask) == value`` on the argument's low 32 bits (libseccomp MASKED_EQ).

    The one exception is ``null_pointer``: mask :data:`MASK64`, value 0, all 64 bits
    compared (a pointer whose low half is zero is not NULL).
    """

    arg: int
    mask: int
    value: int

    def __str__(self) -> str:
        if self.mask == MASK64:
            return f"arg{self.arg} is NULL"
        if self.mask == MASK32:
            return f"arg{self.arg} == {self.value:#x}"
        return f"arg{self.arg} & {self.mask:#x} == {self.value:#x}"


@dataclass(frozen=True)
class Origin:
    """Where a rule comes from: the section and place it is written, and the
    groups the syscall came through (outermost first)."""

    section: Section
    location: Location | None = None
    via: tuple[str, ...] = ()

    def __str__(self) -> str:
        text: str = self.section
        if self.via:
            text += " via " + " > ".join(self.via)
        if self.location is not None:
            text += f" at {self.location}"
        return text


@dataclass(frozen=True)
class Rule:
    """One filter rule: the action for ``syscall`` when all ``checks`` hold."""

    syscall: str
    number: int
    action: Action
    checks: tuple[ArgCheck, ...]
    origin: Origin

    def __str__(self) -> str:
        where = f" if {' and '.join(map(str, self.checks))}" if self.checks else ""
        return f"{self.syscall}{where}: {self.action} ({self.origin})"


@dataclass(frozen=True)
class Policy:
    """A loaded policy: includes merged, groups expanded, precedence settled.

    ``rules`` holds every rule in force, sorted by syscall; several rules for
    one syscall are alternatives. Rules whose action equals ``default`` are
    listed (they document a denial) but never emitted. ``overridden`` holds
    the entries another one beat (deny or errno over allow, an always-denied
    syscall over anything), with their own origin, for ``policy show``.
    """

    name: str
    source: Path
    default: Action
    rules: tuple[Rule, ...]
    overridden: tuple[Rule, ...]
    files: tuple[Path, ...]

    @property
    def deny_action(self) -> Action:
        """What ``deny`` and always-denied syscalls get: the default errno, else EPERM."""
        return deny_action(self.default)

    def allowed(self) -> frozenset[str]:
        """The syscalls allowed, unconditionally or with conditions."""
        return frozenset(r.syscall for r in self.rules if r.action == ALLOW)

    def guards(self) -> dict[str, ArgGuard]:
        """The argument guards the compiled filter needs.

        One per always-denied argument condition of a syscall this policy
        allows, unless every allow rule of it already pins that argument to
        values the guard lets through.
        """
        needed = {}
        for name, guard in ALWAYS_DENIED.items():
            if guard is None:
                continue
            rules = [r for r in self.rules if r.syscall == name and r.action == ALLOW]
            if rules and not all(_pinned(r, guard) for r in rules):
                needed[name] = guard
        return needed


def _pinned(rule: Rule, guard: ArgGuard) -> bool:
    """Whether ``rule`` only matches argument values ``guard`` lets through."""
    return any(
        c.arg == guard.arg and c.mask == MASK32 and not guard.denies(c.value) for c in rule.checks
    )


def deny_action(default: Action) -> Action:
    """The action of a denied syscall under ``default``."""
    return default if default.kind == "errno" else EPERM


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy compiled to a classic BPF program for seccomp(SECCOMP_SET_MODE_FILTER).

    ``bpf`` is the ``struct sock_filter`` array (8 bytes an instruction, host
    byte order), ``digest`` the SHA-256 of it in hex.
    """

    name: str
    source: Path
    bpf: bytes
    instructions: int
    digest: str
    policy: Policy = field(repr=False)

    def pfc(self) -> str:
        """libseccomp's pseudo filter code for this policy, for debugging."""
        return export_pfc(self.policy)


# ---------------------------------------------------------------------------
# Finding policy files.


def _is_path(name_or_path: str) -> bool:
    return "/" in name_or_path or name_or_path.endswith(_SUFFIXES) or name_or_path[:1] in ".~"


def _search_dirs() -> list[Path]:
    extra = os.environ.get(POLICY_PATH_ENV, "")
    return [Path(d) for d in extra.split(":") if d] + [POLICIES_DIR]


def _candidates(name_or_path: str, relative_to: Path | None) -> list[Path]:
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        return [path if path.is_absolute() else (relative_to or Path.cwd()) / path]
    return [d / f"{name_or_path}{suffix}" for d in _search_dirs() for suffix in _SUFFIXES]


def _find(name_or_path: str, relative_to: Path | None) -> Path | str:
    """The resolved path of a policy, or a message saying what was searched."""
    if not name_or_path or not (_is_path(name_or_path) or _NAME.fullmatch(name_or_path)):
        return f"{name_or_path!r} is neither a policy name nor a path"
    candidates = _candidates(name_or_path, relative_to)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    return f"policy {name_or_path!r} not found (looked for {looked})"


def find_policy(name_or_path: str, *, relative_to: Path | None = None) -> Path:
    """The resolved path of a policy given by name or path.

    A value containing ``/``, starting with ``.`` or ``~`` or ending in
    ``.yaml``/``.yml`` is a path, relative to ``relative_to`` (a directory;
    default the current one). Anything else is a name, looked up as
    ``NAME.yaml`` (then ``.yml``) in ``$CAPVISOR_POLICY_PATH`` and then
    :data:`POLICIES_DIR`. Raises :class:`PolicyError` (without a location)
    naming every file looked for.
    """
    found = _find(name_or_path, relative_to)
    if isinstance(found, str):
        raise PolicyError.single(None, found)
    return found


# ---------------------------------------------------------------------------
# Reading one file.


@dataclass(frozen=True)
class _Entry:
    """One syscall as written in (or expanded from) one policy entry."""

    syscall: str
    number: int
    origin: Origin
    checks: tuple[ArgCheck, ...] = ()
    errno: int = 0


@dataclass
class _File:
    path: Path
    default: Action | None = None
    includes: list[tuple[str, Location | None]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


class _FileReader:
    """Checks one policy document and turns it into :class:`_Entry` values."""

    def __init__(self, source: Source, path: Path) -> None:
        self.source = source
        self.file = _File(path)

    def error(self, location: Location | None, message: str) -> None:
        self.source.error(location, message)

    def read(self, doc: Any) -> _File:
        if not isinstance(doc, CommentedMap):
            where = self.source.of(doc) or Location(self.source.filename, 1, 1)
            self.error(where, f"a policy is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
            return self.file
        self.source.unknown_keys(doc, TOP_LEVEL_KEYS, "a policy")
        readers = {
            "version": self.version,
            "include": self.include,
            "default": self.default,
            "allow": self.allow,
            "allow_if": self.allow_if,
            "deny": self.deny,
            "errno": self.errno,
        }
        for key, reader in readers.items():
            if key in doc:
                reader(doc, key)
        return self.file

    # -- top-level keys ------------------------------------------------------

    def version(self, doc: CommentedMap, key: str) -> None:
        value = doc[key]
        if value != LANGUAGE_VERSION or isinstance(value, bool):
            self.error(
                self.source.value_at(doc, key),
                f"unsupported policy version {value!r} (this capvisor reads version 1)",
            )

    def include(self, doc: CommentedMap, key: str) -> None:
        value = doc[key]
        if isinstance(value, str):
            self.file.includes.append((value, self.source.value_at(doc, key)))
            return
        for i, item in self.strings(doc, key, "policy names or paths"):
            self.file.includes.append((item, self.source.value_at(value, i)))

    def default(self, doc: CommentedMap, key: str) -> None:
        value = doc[key]
        where = self.source.value_at(doc, key)
        if value in ("kill", "log"):
            self.file.default = Action(value)
        elif value == "allow":
            self.error(where, "the default cannot be allow: a policy is an allow-list")
        else:
            number = self.errno_value(value, where, "default (an errno name, kill or log)")
            if number is not None:
                self.file.default = Action("errno", number)

    def allow(self, doc: CommentedMap, key: str) -> None:
        for name, where in self.names(doc, key):
            self.file.entries.extend(self.expand(name, where, "allow"))

    def deny(self, doc: CommentedMap, key: str) -> None:
        for name, where in self.names(doc, key):
            self.file.entries.extend(self.expand(name, where, "deny"))

    def errno(self, doc: CommentedMap, key: str) -> None:
        table = self.mapping(doc, key, "a mapping of syscall or @group names to errno names")
        if table is None:
            return
        for name in table:
            number = self.errno_value(table[name], self.source.value_at(table, name), "errno")
            entries = self.expand(str(name), self.source.key_at(table, name), "errno")
            if number is not None:
                self.file.entries.extend(_with_errno(e, number) for e in entries)

    def allow_if(self, doc: CommentedMap, key: str) -> None:
        table = self.mapping(doc, key, "a mapping of syscall names to argument conditions")
        if table is None:
            return
        for name in table:
            where = self.source.key_at(table, name)
            if str(name).startswith("@"):
                self.error(where, f"conditions apply to one syscall, not to the group {name}")
                continue
            entries = list(self.expand(str(name), where, "allow_if"))
            for alternative in self.alternatives(table, name):
                self.file.entries.extend(_with_checks(e, alternative) for e in entries)

    # -- shapes --------------------------------------------------------------

    def mapping(self, parent: Any, key: Any, what: str) -> CommentedMap | None:
        value = parent[key]
        if isinstance(value, CommentedMap):
            return value
        self.error(self.source.value_at(parent, key), f"{key} must be {what}")
        return None

    def strings(self, parent: Any, key: Any, what: str) -> Iterator[tuple[int, str]]:
        """``(index, text)`` of a list of strings; other items are reported."""
        value = parent[key]
        if not isinstance(value, CommentedSeq):
            self.error(self.source.value_at(parent, key), f"{key} must be a list of {what}")
            return
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield i, item
            else:
                self.error(self.source.value_at(value, i), f"expected one of {what}, not {item!r}")

    def names(self, doc: CommentedMap, key: str) -> Iterator[tuple[str, Location | None]]:
        for i, name in self.strings(doc, key, "syscall and @group names"):
            yield name, self.source.value_at(doc[key], i)

    def errno_value(self, value: Any, where: Location | None, what: str) -> int | None:
        number = _errno_number(value)
        if number is None:
            hint = suggest(str(value), errno_module.errorcode.values()) if value else ""
            self.error(where, f"unknown {what}: {value!r}{hint}")
        return number

    # -- names and groups ----------------------------------------------------

    def expand(self, name: str, where: Location | None, section: Section) -> list[_Entry]:
        """The entries ``name`` (a syscall or an @group) stands for; problems reported."""
        if name.startswith("@"):
            if name not in GROUPS:
                self.error(where, f"unknown group {name}{suggest(name, GROUPS)}")
                return []
            return [
                _Entry(member, number, Origin(section, where, via))
                for member, via in expand(name)
                if (number := syscall_number(member)) >= 0
            ]
        number = syscall_number(name)
        if number == _NR_ERROR:
            self.error(where, f"unknown syscall {name!r}{suggest(name, _KNOWN_NATIVE)}")
        elif number < 0:
            self.error(
                where,
                f"{name} is not a syscall on {_NATIVE_ARCH_NAME} (libseccomp knows it on "
                "other architectures; groups skip such names, a policy may not name them)",
            )
        else:
            return [_Entry(name, number, Origin(section, where))]
        return []

    # -- argument conditions -------------------------------------------------

    def alternatives(self, table: CommentedMap, name: Any) -> Iterator[tuple[ArgCheck, ...]]:
        """Every alternative of one ``allow_if`` syscall: each is a tuple of AND-ed checks."""
        value = table[name]
        if isinstance(value, CommentedMap):
            yield from self.entry(table, name)
        elif isinstance(value, CommentedSeq) and value:
            for i in range(len(value)):
                yield from self.entry(value, i)
        else:
            self.error(
                self.source.value_at(table, name),
                f"the conditions of {name} must be a mapping of arg0..arg5 to conditions, "
                "or a non-empty list of such mappings (alternatives)",
            )

    def entry(self, parent: Any, key: Any) -> Iterator[tuple[ArgCheck, ...]]:
        """The alternatives of one entry: the product of its arguments' alternatives."""
        value = parent[key]
        where = self.source.value_at(parent, key)
        if not isinstance(value, CommentedMap) or not value:
            self.error(where, "expected a non-empty mapping of arg0..arg5 to conditions")
            return
        per_arg = []
        for arg_key in value:
            if arg_key not in ARG_KEYS:
                self.error(
                    self.source.key_at(value, arg_key),
                    f"unknown argument {arg_key!r} (arguments are arg0 to arg5)",
                )
                continue
            per_arg.append(self.condition(value, arg_key, ARG_KEYS.index(arg_key)))
        yield from itertools.product(*per_arg)

    def condition(self, parent: CommentedMap, key: str, arg: int) -> list[ArgCheck]:
        """One argument's condition as alternative checks (several only for any_of)."""
        value = parent[key]
        where = self.source.value_at(parent, key)
        if value == "nonneg_fd":
            return [ArgCheck(arg, 0x80000000, 0)]
        if value == "null_pointer":
            return [ArgCheck(arg, MASK64, 0)]
        if not isinstance(value, CommentedMap):
            self.error(
                where, f"a condition is nonneg_fd, null_pointer or a mapping with {_CONDITION_KEYS}"
            )
            return []
        before = len(self.source.problems)
        self.source.unknown_keys(value, ("any_of", "none_of_mask", "eq", "mask"), "a condition")
        kinds = [k for k in value if k in ("any_of", "none_of_mask", "eq")]
        if len(self.source.problems) > before:
            return []
        if len(kinds) != 1 or ("mask" in value and kinds != ["eq"]):
            self.error(where, f"a condition has exactly one of {_CONDITION_KEYS}")
            return []
        kind: str = kinds[0]
        if kind == "any_of":
            return self.any_of(value, arg)
        if kind == "none_of_mask":
            return self.none_of_mask(value, arg)
        return self.eq(value, arg)

    def any_of(self, cond: CommentedMap, arg: int) -> list[ArgCheck]:
        values = self.constants(cond, "any_of")
        return [ArgCheck(arg, MASK32, v) for v in dict.fromkeys(values)]

    def none_of_mask(self, cond: CommentedMap, arg: int) -> list[ArgCheck]:
        values = self.constants(cond, "none_of_mask")
        mask = 0
        for v in values:
            mask |= v
        return [ArgCheck(arg, mask, 0)] if values else []

    def eq(self, cond: CommentedMap, arg: int) -> list[ArgCheck]:
        value = self.constant(cond, "eq")
        mask = self.constant(cond, "mask") if "mask" in cond else MASK32
        if value is None or mask is None:
            return []
        if value & ~mask:
            self.error(
                self.source.value_at(cond, "eq"),
                f"{value:#x} has bits outside the mask {mask:#x}: the condition never holds",
            )
            return []
        return [ArgCheck(arg, mask, value)]

    def constants(self, cond: CommentedMap, key: str) -> list[int]:
        items = cond[key]
        if not isinstance(items, CommentedSeq) or not items:
            self.error(self.source.value_at(cond, key), f"{key} must be a non-empty list")
            return []
        return [v for i in range(len(items)) if (v := self.constant(items, i)) is not None]

    def constant(self, parent: Any, key: Any) -> int | None:
        """A 32-bit value: a name from CONSTANTS or an integer (negatives wrap)."""
        value = parent[key]
        where = self.source.value_at(parent, key)
        if isinstance(value, bool):
            self.error(where, f"expected a constant, not {value!r}")
        elif isinstance(value, int):
            if -(1 << 31) <= value <= MASK32:
                return value & MASK32
            self.error(where, f"{value} does not fit in 32 bits")
        elif isinstance(value, str) and value in CONSTANTS:
            return CONSTANTS[value] & MASK32
        else:
            self.error(where, f"unknown constant {value!r}{suggest(str(value), CONSTANTS)}")
        return None


def _with_errno(entry: _Entry, number: int) -> _Entry:
    return _Entry(entry.syscall, entry.number, entry.origin, errno=number)


def _with_checks(entry: _Entry, checks: tuple[ArgCheck, ...]) -> _Entry:
    return _Entry(entry.syscall, entry.number, entry.origin, checks=tuple(sorted(checks)))


def _errno_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 4096 else None
    if isinstance(value, str) and re.fullmatch(r"E[A-Z0-9]+", value):
        number = getattr(errno_module, value, None)
        return number if isinstance(number, int) else None
    return None


def _read_file(path: Path, problems: list[Problem]) -> _File:
    source = Source(str(path))
    file = _File(path)
    text = read_text(path, source)
    if text is not None:
        doc = load_yaml(text, source)
        if doc is None and not source.problems:
            source.error(Location(str(path), 1, 1), "empty policy")
        elif doc is not None:
            file = _FileReader(source, path).read(doc)
    problems.extend(source.problems)
    return file


# ---------------------------------------------------------------------------
# Includes.


class _Loader:
    """Reads a policy and its includes depth first; includes come before includers."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.files: dict[Path, _File | None] = {}
        self.order: list[_File] = []

    def load(self, path: Path, stack: tuple[Path, ...] = ()) -> None:
        if path in self.files:
            return
        self.files[path] = None
        file = _read_file(path, self.problems)
        for name, where in file.includes:
            self.include(name, where, path, stack)
        self.files[path] = file
        self.order.append(file)

    def include(
        self, name: str, where: Location | None, path: Path, stack: tuple[Path, ...]
    ) -> None:
        target = _find(name, path.parent)
        if isinstance(target, str):
            self.problems.append(Problem(where, f"cannot include: {target}"))
        elif target in (*stack, path):
            chain = [*stack, path]
            names = " -> ".join(str(p) for p in [*chain[chain.index(target) :], target])
            self.problems.append(Problem(where, f"include cycle: {names}"))
        else:
            self.load(target, (*stack, path))


# ---------------------------------------------------------------------------
# Precedence: errno > deny (and always denied) > allow.


class _Merger:
    def __init__(self, default: Action, problems: list[Problem]) -> None:
        self.default = default
        self.problems = problems
        self.rules: list[Rule] = []
        self.overridden: list[Rule] = []

    def merge(self, entries: Iterable[_Entry]) -> None:
        by_syscall: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_syscall.setdefault(entry.syscall, []).append(entry)
        for name, guard in ALWAYS_DENIED.items():
            if guard is None:
                always = _Entry(name, syscall_number(name), Origin("always denied"))
                by_syscall.setdefault(name, []).insert(0, always)
        for name in sorted(by_syscall):
            self.syscall(by_syscall[name])

    def syscall(self, entries: list[_Entry]) -> None:
        errnos = [e for e in entries if e.origin.section == "errno"]
        denies = [e for e in entries if e.origin.section in ("deny", "always denied")]
        allows = [e for e in entries if e.origin.section in ("allow", "allow_if")]
        if errnos:
            self.errno(errnos)
            self.lose(denies + allows)
        elif denies:
            first = denies[0]
            self.rules.append(
                Rule(first.syscall, first.number, deny_action(self.default), (), first.origin)
            )
            self.lose(allows)
        else:
            self.allow(allows)

    def errno(self, entries: list[_Entry]) -> None:
        first = entries[0]
        action = Action("errno", first.errno)
        for entry in entries:
            if entry.errno != first.errno:
                self.problems.append(
                    Problem(
                        entry.origin.location,
                        f"{entry.syscall}: errno {errno_name(entry.errno)} conflicts with "
                        f"{errno_name(first.errno)} ({first.origin})",
                    )
                )
            elif action == self.default:
                self.problems.append(
                    Problem(
                        entry.origin.location,
                        f"{entry.syscall}: {action} is already the default action "
                        "(the compiler never emits a rule equal to the default)",
                    )
                )
        self.rules.append(Rule(first.syscall, first.number, action, (), first.origin))

    def allow(self, entries: list[_Entry]) -> None:
        plain = [e for e in entries if not e.checks]
        conditional = [e for e in entries if e.checks]
        if plain and conditional:
            for origin in dict.fromkeys(e.origin for e in conditional):
                self.problems.append(
                    Problem(
                        origin.location,
                        f"{plain[0].syscall} is allowed with conditions here and unconditionally "
                        f"({plain[0].origin}); libseccomp would drop the conditions",
                    )
                )
        if plain:
            chosen = plain[:1]
        else:  # one rule per distinct alternative, the first origin of each
            chosen = list({e.checks: e for e in reversed(conditional)}.values())[::-1]
        for e in chosen:
            self.rules.append(Rule(e.syscall, e.number, ALLOW, e.checks, e.origin))

    def lose(self, entries: list[_Entry]) -> None:
        for e in entries:
            action = (
                ALLOW if e.origin.section in ("allow", "allow_if") else deny_action(self.default)
            )
            self.overridden.append(Rule(e.syscall, e.number, action, e.checks, e.origin))


def load_policy(name_or_path: str, *, relative_to: Path | None = None) -> Policy:
    """Read, check and expand a policy (see :func:`find_policy` for the lookup).

    Includes are read depth first and merged (an included file's ``default``
    is ignored: the loaded file's applies, EPERM when it has none). Raises
    :class:`PolicyError` listing every problem of every file, each with its
    file, line and column.
    """
    path = find_policy(name_or_path, relative_to=relative_to)
    loader = _Loader()
    loader.load(path)
    top = loader.files[path]
    default = (top.default if top else None) or EPERM
    merger = _Merger(default, loader.problems)
    merger.merge(e for f in loader.order for e in f.entries)
    if loader.problems:
        raise PolicyError(loader.problems)
    return Policy(
        name=path.stem,
        source=path,
        default=default,
        rules=tuple(sorted(merger.rules, key=lambda r: (r.syscall, r.checks))),
        overridden=tuple(merger.overridden),
        files=tuple(f.path for f in loader.order),
    )


# ---------------------------------------------------------------------------
# Compiling.

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_BINARY_TREE_MIN_SYSCALLS = 8


def _arg_offset(arg: int) -> int:
    """Offset of the low 32 bits of ``args[arg]`` in struct seccomp_data."""
    return 16 + 8 * arg + (4 if sys.byteorder == "big" else 0)


@dataclass(frozen=True)
class _Insn:
    """A BPF instruction whose jump targets are labels (``None``: the next one)."""

    code: int
    k: int
    jt: str | None = None
    jf: str | None = None


def _guard(policy: Policy) -> list[_Insn | str]:
    """The guard: kill a foreign arch, deny always-denied argument values.

    Empty when the policy needs no argument guard (libseccomp's filter checks
    the arch itself). A string in the list defines a label: ``deny`` and
    ``kill`` return, ``start`` is the first instruction of libseccomp's filter.
    """
    guards = sorted(policy.guards().items())
    if not guards:
        return []
    prog: list[_Insn | str] = [
        _Insn(_BPF_LD_W_ABS, _OFFSET_ARCH),
        _Insn(_BPF_JEQ_K, NATIVE_ARCH, None, "kill"),
        _Insn(_BPF_LD_W_ABS, _OFFSET_NR),
    ]
    for i, (name, guard) in enumerate(guards):
        other = f"syscall{i + 1}" if i + 1 < len(guards) else "start"
        prog += [f"syscall{i}", _Insn(_BPF_JEQ_K, syscall_number(name), None, other)]
        prog.append(_Insn(_BPF_LD_W_ABS, _arg_offset(guard.arg)))
        matched, unmatched = ("start", "deny") if guard.only else ("deny", "start")
        for j, value in enumerate(guard.values):
            last = j == len(guard.values) - 1
            prog.append(_Insn(_BPF_JEQ_K, value, matched, unmatched if last else None))
    prog += ["deny", _Insn(_BPF_RET_K, policy.deny_action.seccomp)]
    prog += ["kill", _Insn(_BPF_RET_K, pyseccomp.KILL_PROCESS), "start"]
    return prog


def _assemble(prog: list[_Insn | str]) -> bytes:
    """Resolve labels and pack ``struct sock_filter`` entries (host byte order)."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for pc, insn in enumerate(insns):
        jt, jf = (0 if t is None else labels[t] - pc - 1 for t in (insn.jt, insn.jf))
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise AssertionError(f"guard jump out of range at {pc}")
        out += struct.pack("=HBBI", insn.code, jt, jf, insn.k)
    return bytes(out)


def _filter(policy: Policy) -> pyseccomp.SyscallFilter:
    """libseccomp's filter for ``policy``: native arch only, bad arch kills.

    Large filters use libseccomp's binary tree (a syscall costs O(log n)
    comparisons instead of a linear scan); libseccomp <= 2.5.3 mishandled
    the tree without rules, so small filters keep the linear form.
    """
    scf = pyseccomp.SyscallFilter(policy.default.seccomp)
    scf.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    emitted = [rule for rule in policy.rules if rule.action != policy.default]
    if len({rule.syscall for rule in emitted}) >= _BINARY_TREE_MIN_SYSCALLS:
        scf.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    for rule in emitted:
        args = [pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, c.mask, c.value) for c in rule.checks]
        try:
            scf.add_rule(rule.action.seccomp, rule.number, *args)
        except OSError as exc:
            raise PolicyError.single(
                rule.origin.location, f"libseccomp refused {rule}: {exc.strerror}"
            ) from exc
    return scf


def _export(scf: pyseccomp.SyscallFilter, pfc: bool) -> bytes:
    fd = os.memfd_create("capvisor-policy", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as file:
        (scf.export_pfc if pfc else scf.export_bpf)(file)
        file.seek(0)
        return file.read()


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Compile ``policy`` to BPF: the guard, then libseccomp's filter.

    Raises :class:`PolicyError` if libseccomp refuses a rule (which the
    checks in :func:`load_policy` should make impossible).
    """
    bpf = _assemble(_guard(policy)) + _export(_filter(policy), pfc=False)
    return CompiledPolicy(
        name=policy.name,
        source=policy.source,
        bpf=bpf,
        instructions=len(bpf) // 8,
        digest=hashlib.sha256(bpf).hexdigest(),
        policy=policy,
    )


def export_pfc(policy: Policy) -> str:
    """libseccomp's pseudo filter code for ``policy``, after a description of the guard."""
    guards = sorted(policy.guards().items())
    lines = ["#", "# capvisor guard (runs first)", "#"] if guards else []
    if guards:
        lines.append(f"if ($arch != {NATIVE_ARCH}) action KILL_PROCESS;")
    deny = f"ERRNO({policy.deny_action.errno})"
    for name, guard in guards:
        operator, joiner = ("!=", " && ") if guard.only else ("==", " || ")
        test = joiner.join(f"$a{guard.arg}.lo32 {operator} {v:#x}" for v in guard.values)
        lines.append(f"# guard for syscall {name!r}")
        lines.append(f"if ($syscall == {syscall_number(name)})")
        lines.append(f"  if ({test}) action {deny};")
    head = "".join(line + "\n" for line in lines)
    return head + _export(_filter(policy), pfc=True).decode()


# ---------------------------------------------------------------------------
# The cache.

_Stamps = tuple[tuple[Path, int], ...]
_cache: dict[Path, tuple[_Stamps, CompiledPolicy]] = {}
_cache_lock = threading.Lock()


def _stamps(paths: Iterable[Path]) -> _Stamps | None:
    try:
        return tuple((p, p.stat().st_mtime_ns) for p in paths)
    except OSError:
        return None


def compiled(name_or_path: str, *, relative_to: Path | None = None) -> CompiledPolicy:
    """:func:`load_policy` and :func:`compile_policy`, cached.

    The result is reused while the policy file and every file it includes
    keep their modification times. Raises :class:`PolicyError`.
    """
    path = find_policy(name_or_path, relative_to=relative_to)
    with _cache_lock:
        hit = _cache.get(path)
    if hit is not None and _stamps(p for p, _ in hit[0]) == hit[0]:
        return hit[1]
    before = _stamps([path])
    result = compile_policy(load_policy(str(path)))
    stamps = _stamps(result.policy.files)
    if before is not None and stamps is not None and dict(stamps)[path] == before[0][1]:
        with _cache_lock:
            _cache[path] = (stamps, result)
    return result


def clear_cache() -> None:
    """Forget every compiled policy (for tests and benchmarks)."""
    with _cache_lock:
        _cache.clear()
