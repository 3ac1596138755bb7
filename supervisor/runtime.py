"""The read-only runtime set: what a program needs just to start.

For an ELF program that is the program, its ELF interpreter, every
``DT_NEEDED`` library (recursively, searched the way glibc's ld.so searches:
DT_RPATH of the requesting chain unless the requester has DT_RUNPATH,
LD_LIBRARY_PATH from the program's env, DT_RUNPATH, the ld.so.conf
directories standing in for the cache, the default directories; with
``$ORIGIN``/``$LIB``/``$PLATFORM`` expanded and libraries of another ELF class
or machine skipped) and /etc/ld.so.cache. For a ``#!`` script it is the script
and its interpreter's runtime set (``#!/usr/bin/env NAME`` looks NAME up in
the env's PATH). For CPython it adds the stdlib tree, the libraries the
``lib-dynload`` extension modules need, and a venv's ``pyvenv.cfg`` and
site-packages; /usr/lib/locale when the env names a locale other than
C/POSIX. Nothing is executed to find this out.

/etc (beyond the loader's files), /home, /root, /tmp, /dev/shm and /proc are
never granted as a whole; files inside them (a program under /tmp, an
interpreter's own tree under /root) are granted one by one.

Verbs: :func:`runtime_set`, :func:`clear_cache`; :meth:`RuntimeSet.report`.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .elf import ET_DYN, ElfError, ElfIdentity, ElfInfo, is_elf, read_elf, read_identity
from .errors import ConfinementError, ProgramNotExecutable, ProgramNotFound, ResolveError
from .landlock import PathGrant

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
LD_SO_CACHE = "/etc/ld.so.cache"
LD_SO_CONF = "/etc/ld.so.conf"
LD_SO_PRELOAD = "/etc/ld.so.preload"
LOCALE_DIR = "/usr/lib/locale"
#: binfmt_script nests at most this deep (the kernel's BINPRM_MAX_RECURSION).
MAX_INTERPRETER_DEPTH = 4
#: Never granted as a whole (nor any directory containing one of them).
NEVER_WHOLE = ("/etc", "/home", "/root", "/tmp", "/dev/shm", "/proc")
REASON_EXTRA = "runtime (description)"

_MACHINE = os.uname().machine
_MULTIARCH = f"{_MACHINE}-linux-gnu"
#: glibc's $PLATFORM (AT_PLATFORM) and $LIB (Debian: lib/<multiarch>).
_PLATFORM = _MACHINE
_LIB = (
    f"lib/{_MULTIARCH}"
    if os.path.isdir(f"/usr/lib/{_MULTIARCH}")
    else "lib64"
    if os.path.isdir("/usr/lib64")
    else "lib"
)
DEFAULT_LIB_DIRS = (
    f"/lib/{_MULTIARCH}",
    f"/usr/lib/{_MULTIARCH}",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
#: Subdirectories ld.so tries in each search directory before the directory
#: itself (glibc-hwcaps levels, then the legacy hwcap names). All that exist
#: and hold the library are granted: which one wins depends on the CPU.
_HWCAP_SUBDIRS = (
    "glibc-hwcaps/x86-64-v4",
    "glibc-hwcaps/x86-64-v3",
    "glibc-hwcaps/x86-64-v2",
    "tls/x86_64/x86_64",
    "tls/x86_64",
    "tls",
    "x86_64/x86_64",
    "x86_64",
)
_PYTHON_RE = re.compile(r"python(?:(\d+)(?:\.(\d+))?)?[dmu]*")
_LIBPYTHON_RE = re.compile(r"libpython(\d+\.\d+)[dmu]*\.so(?:\..*)?")
_TOKEN_RE = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")
_MAX_CACHE = 256


@dataclass(frozen=True)
class RuntimeSet:
    """Read+execute grants a program needs to start, each with a reason.

    ``unresolved`` lists what was looked for and not found (a missing
    ``DT_NEEDED`` library, say): the program may fail to start, but that is
    the program's failure, not a reason to refuse the launch.
    """

    grants: tuple[PathGrant, ...]
    unresolved: tuple[str, ...] = ()

    def report(self) -> list[dict[str, str]]:
        """One JSON-able entry per grant: path, kind (file or dir), reason."""
        return [
            {
                "path": g.path,
                "kind": "dir" if os.path.isdir(g.path) else "file",
                "reason": g.reason,
            }
            for g in self.grants
        ]


@dataclass
class _Loaded:
    """An object in the (simulated) link map."""

    path: str  # as found: ld.so takes $ORIGIN from it (the main program: its real path)
    info: ElfInfo
    loader: _Loaded | None


def check_executable(path: str, what: str) -> None:
    """Raise unless ``path`` is an executable regular file; messages start ``what: ``.

    :class:`ProgramNotFound` when it does not exist, else
    :class:`ProgramNotExecutable` naming the reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ProgramNotFound(f"{what}: No such file or directory") from None
    except OSError as exc:
        raise ProgramNotExecutable(f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProgramNotExecutable(f"{what}: not a regular file")
    if not os.access(path, os.X_OK):
        raise ProgramNotExecutable(f"{what}: not executable")


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _contains_never(real: str) -> bool:
    """Whether granting directory ``real`` would grant a never-granted tree."""
    return any(_under(never, real) for never in NEVER_WHOLE)


def _needs_locale(env: Mapping[str, str]) -> bool:
    return any(
        (name == "LANG" or name.startswith("LC_")) and value not in ("", "C", "POSIX")
        for name, value in env.items()
    )


class _Builder:
    """One cold computation of a runtime set."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.entries: dict[str, tuple[PathGrant, bool]] = {}  # real path -> (grant, is_dir)
        self.unresolved: list[str] = []
        self.chain: list[str] = []  # programs and interpreters as named: the cache validators
        self._elf: dict[str, ElfInfo | None] = {}
        self._variants: dict[str, tuple[str, ...]] = {}
        self._conf_dirs: tuple[str, ...] | None = None

    # -- grants --------------------------------------------------------------

    def add(self, path: str, reason: str, *, is_dir: bool = False) -> None:
        real = os.path.realpath(path)
        if is_dir and _contains_never(real):
            self.unresolved.append(f"{path}: not granted ({reason}); it would expose {real}")
            return
        if real not in self.entries:
            self.entries[real] = (PathGrant(real, False, reason=reason), is_dir)

    def grants(self) -> tuple[PathGrant, ...]:
        dirs = {real for real, (_, is_dir) in self.entries.items() if is_dir}

        def covered(real: str) -> bool:
            parent = os.path.dirname(real)
            while parent != "/":
                if parent in dirs:
                    return True
                parent = os.path.dirname(parent)
            return False

        return tuple(
            grant
            for real, (grant, is_dir) in self.entries.items()
            if is_dir or grant.reason == REASON_EXTRA or not covered(real)
        )

    # -- programs and scripts ------------------------------------------------

    def program(self, path: str, *, reason: str, depth: int) -> None:
        """Add ``path`` (a program or an interpreter) and its own runtime set."""
        self.chain.append(os.path.abspath(path))
        real = os.path.realpath(path)
        check_executable(real, f"{reason} {path}")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
            try:
                header = os.pread(fd, 256, 0)  # the kernel's BINPRM_BUF_SIZE
            finally:
                os.close(fd)
        except FileNotFoundError as e:
            raise ProgramNotFound(f"{reason} {path}: No such file or directory") from e
        except OSError as e:
            raise ProgramNotExecutable(f"{reason} {path}: {e.strerror}") from e
        self.add(real, reason)
        if is_elf(header):
            try:
                info = read_elf(real)
            except ElfError as e:
                raise ConfinementError(f"{reason} {path}: {e}") from e
            self.elf_program(path, real, info)
        elif header.startswith(b"#!"):
            self.script(path, header, depth)
        else:
            self.unresolved.append(f"{path}: neither an ELF file nor a #! script")

    def script(self, path: str, header: bytes, depth: int) -> None:
        if depth >= MAX_INTERPRETER_DEPTH:
            raise ProgramNotExecutable(
                f"{path}: more than {MAX_INTERPRETER_DEPTH} levels of #! interpreters"
            )
        line = header[2:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape").strip(" \t")
        interp, _, arg = line.partition(" ")
        if "\t" in interp:
            interp, _, rest = interp.partition("\t")
            arg = f"{rest} {arg}".strip()
        arg = arg.strip(" \t")
        if not interp.startswith("/"):
            raise ProgramNotExecutable(f"{path}: #! interpreter {interp!r} is not an absolute path")
        self.program(interp, reason="interpreter", depth=depth + 1)
        if os.path.basename(os.path.realpath(interp)) == "env" and arg:
            name = self._env_command(arg)
            if name is None:
                return
            found = name if "/" in name else self._which(name)
            if found is None:
                self.unresolved.append(f"{path}: {name} not found in PATH")
            else:
                self.program(found, reason="interpreter", depth=depth + 1)

    @staticmethod
    def _env_command(arg: str) -> str | None:
        """The command ``env ARG`` runs: skip options and NAME=VALUE settings."""
        words = arg.split()
        i = 0
        while i < len(words):
            word = words[i]
            if word.startswith("-S") and len(word) > 2:
                words[i : i + 1] = word[2:].split()
                continue
            if word in ("-u", "--unset", "-C", "--chdir"):
                i += 2
                continue
            if word.startswith("-") or ("=" in word and not word.startswith("=")):
                i += 1
                continue
            return word
        return None

    def _which(self, name: str) -> str | None:
        for directory in self.env.get("PATH", DEFAULT_PATH).split(":"):
            candidate = os.path.join(directory or ".", name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        return None

    # -- ELF programs and libraries ------------------------------------------

    def elf_program(self, path: str, real: str, info: ElfInfo) -> None:
        main = _Loaded(real, info, None)
        loaded: set[str] = set()
        if info.interp is not None:
            interp_info = self._elf_matching(info.interp, info.identity)
            if interp_info is None:
                self.unresolved.append(f"ELF interpreter {info.interp} of {path}: not found")
            else:
                self.add(info.interp, "interpreter")
                loaded.add(os.path.basename(info.interp))
                if interp_info.soname:
                    loaded.add(interp_info.soname)
        if info.dynamic:
            if os.path.exists(LD_SO_CACHE):
                self.add(LD_SO_CACHE, "loader cache")
            self._preload(main, loaded)
        self.closure([main], main, loaded, "library")
        match = _PYTHON_RE.fullmatch(os.path.basename(real))
        if match:
            self.cpython(path, real, info, match, main, loaded)

    def _preload(self, main: _Loaded, loaded: set[str]) -> None:
        try:
            with open(LD_SO_PRELOAD, encoding="utf-8", errors="surrogateescape") as f:
                names = f.read().split()
        except FileNotFoundError:
            return
        except OSError as e:
            self.unresolved.append(f"{LD_SO_PRELOAD}: {e.strerror}")
            return
        self.add(LD_SO_PRELOAD, "loader preload list")
        for name in names:
            found = self.find_library(name, main, main)
            if found:
                for path, _ in found:
                    self.add(path, "library (preload)")
                self.closure([_Loaded(found[0][0], found[0][1], main)], main, loaded, "library")

    def closure(
        self, roots: Iterable[_Loaded], main: _Loaded, loaded: set[str], reason: str
    ) -> None:
        """Add the DT_NEEDED closure of ``roots``, breadth first as ld.so loads it."""
        queue = deque(roots)
        while queue:
            obj = queue.popleft()
            for name in obj.info.needed:
                if name in loaded:
                    continue
                loaded.add(name)
                found = self.find_library(name, obj, main)
                if not found:
                    self.unresolved.append(f"library {name} needed by {obj.path}: not found")
                    continue
                for path, _ in found:
                    self.add(path, reason)
                path, info = found[0]
                if info.soname:
                    loaded.add(info.soname)
                queue.append(_Loaded(path, info, obj))

    def find_library(
        self, name: str, requester: _Loaded, main: _Loaded
    ) -> list[tuple[str, ElfInfo]]:
        """Where ld.so finds ``name`` for ``requester`` (every hwcap variant in the first dir)."""
        identity = main.info.identity
        if "/" in name:
            path = self._expand(name, requester)
            info = self._elf_matching(path, identity) if path else None
            return [(path, info)] if path and info else []
        for directory in self._search_dirs(requester, main):
            hits = []
            for variant in self._variant_dirs(directory):
                path = os.path.join(variant, name)
                info = self._elf_matching(path, identity)
                if info is not None:
                    hits.append((path, info))
            if hits:
                return hits
        return []

    def _search_dirs(self, requester: _Loaded, main: _Loaded) -> list[str]:
        dirs: list[str] = []
        if requester.info.runpath is None:
            obj: _Loaded | None = requester
            while obj is not None:
                if obj.info.runpath is None and obj.info.rpath:
                    dirs += self._expand_list(obj.info.rpath, obj)
                obj = obj.loader
        library_path = self.env.get("LD_LIBRARY_PATH")
        if library_path:
            dirs += self._expand_list(library_path.replace(";", ":"), main)
        if requester.info.runpath:
            dirs += self._expand_list(requester.info.runpath, requester)
        if not requester.info.nodeflib:
            dirs += self._ld_so_conf_dirs()
            dirs += DEFAULT_LIB_DIRS
        return list(dict.fromkeys(dirs))

    def _expand(self, entry: str, obj: _Loaded) -> str | None:
        origin = os.path.dirname(obj.path)
        values = {"ORIGIN": origin, "LIB": _LIB, "PLATFORM": _PLATFORM}
        expanded = _TOKEN_RE.sub(lambda m: values[m.group(1) or m.group(2)], entry)
        # Empty and relative entries are relative to the cwd at run time: not followed.
        return expanded if expanded.startswith("/") else None

    def _expand_list(self, value: str, obj: _Loaded) -> list[str]:
        return [d for d in (self._expand(e, obj) for e in value.split(":")) if d]

    def _variant_dirs(self, directory: str) -> tuple[str, ...]:
        variants = self._variants.get(directory)
        if variants is None:
            if not os.path.isdir(directory):
                variants = ()
            else:
                subdirs = [
                    os.path.join(directory, sub)
                    for sub in _HWCAP_SUBDIRS
                    if os.path.isdir(os.path.join(directory, sub))
                ]
                variants = (*subdirs, directory)
            self._variants[directory] = variants
        return variants

    def _ld_so_conf_dirs(self) -> tuple[str, ...]:
        if self._conf_dirs is None:
            dirs: list[str] = []
            _read_ld_so_conf(LD_SO_CONF, dirs, set())
            self._conf_dirs = tuple(dict.fromkeys(dirs))
        return self._conf_dirs

    def _elf_matching(self, path: str, identity: ElfIdentity) -> ElfInfo | None:
        """``path``'s ELF info when it is a loadable library for a program of ``identity``."""
        if path not in self._elf:
            info: ElfInfo | None = None
            try:
                if stat.S_ISREG(os.stat(path).st_mode):
                    with open(path, "rb") as f:
                        header = f.read(20)
                    if is_elf(header) and read_identity(header) == identity:
                        info = read_elf(path)
                        if info.type != ET_DYN:
                            info = None
            except (OSError, ElfError):
                info = None
            self._elf[path] = info
        return self._elf[path]

    # -- interpreters' library trees -----------------------------------------

    def cpython(
        self,
        path: str,
        real: str,
        info: ElfInfo,
        match: re.Match[str],
        main: _Loaded,
        loaded: set[str],
    ) -> None:
        prefix = os.path.dirname(os.path.dirname(real))
        versions: list[str] = []
        if match.group(2) is not None:
            versions = [f"{match.group(1)}.{match.group(2)}"]
        else:
            for needed in info.needed:
                lib = _LIBPYTHON_RE.fullmatch(needed)
                if lib:
                    versions = [lib.group(1)]
                    break
            else:
                versions = sorted(
                    os.path.basename(os.path.dirname(p))[len("python") :]
                    for p in glob.glob(
                        os.path.join(glob.escape(prefix), "lib", "python*.*", "os.py")
                    )
                )
        for version in versions:
            stdlib = os.path.join(prefix, "lib", f"python{version}")
            if not os.path.isfile(os.path.join(stdlib, "os.py")):
                continue
            self.add(stdlib, "interpreter library tree (CPython stdlib)", is_dir=True)
            self._dynload(os.path.join(stdlib, "lib-dynload"), main, loaded)
            self._venv(path, version)

    def _dynload(self, directory: str, main: _Loaded, loaded: set[str]) -> None:
        try:
            entries = sorted(e.path for e in os.scandir(directory) if e.name.endswith(".so"))
        except OSError:
            return
        roots = []
        for module in entries:
            info = self._elf_matching(module, main.info.identity)
            if info is not None:
                roots.append(_Loaded(module, info, main))
        self.closure(roots, main, loaded, "library (CPython extension modules)")

    def _venv(self, path: str, version: str) -> None:
        bindir = os.path.dirname(os.path.abspath(path))
        for root in (bindir, os.path.dirname(bindir)):
            cfg = os.path.join(root, "pyvenv.cfg")
            if os.path.isfile(cfg):
                self.add(cfg, "venv config")
                site = os.path.join(root, "lib", f"python{version}", "site-packages")
                if os.path.isdir(site):
                    self.add(site, "venv site-packages", is_dir=True)
                return

    # -- the rest ------------------------------------------------------------

    def devices(self) -> None:
        """The devices any program may use: sinks and sources of nothing and of noise."""
        for path, writable in HARMLESS_DEVICES:
            if os.path.exists(path) and path not in self.entries:
                self.entries[path] = (PathGrant(path, writable, reason="harmless device"), False)

    def locale(self) -> None:
        if _needs_locale(self.env) and os.path.isdir(LOCALE_DIR):
            self.add(LOCALE_DIR, "locale", is_dir=True)

    def extra(self, paths: Sequence[str]) -> None:
        for path in paths:
            real = os.path.realpath(path)
            if real == "/" or _contains_never(real) or _under(real, "/proc"):
                raise ResolveError(
                    None,
                    f"runtime path {path}: {real} is never part of the runtime set"
                    " (use a !mount or !file capability)",
                )
            if os.path.isfile(real) and os.access(real, os.X_OK):
                # A program the described one runs (a shell's `cat`): its own
                # interpreter and libraries come with it.
                self.program(path, reason=REASON_EXTRA, depth=0)
            elif real not in self.entries:
                self.entries[real] = (PathGrant(path, False, reason=REASON_EXTRA), False)


#: Character devices every program gets (a shell opens /dev/null for a
#: background job's stdin): (path, writable).
HARMLESS_DEVICES = (
    ("/dev/null", True),
    ("/dev/zero", True),
    ("/dev/full", True),
    ("/dev/random", False),
    ("/dev/urandom", False),
)


def _read_ld_so_conf(path: str, dirs: list[str], seen: set[str]) -> None:
    """Append the directories of an ld.so.conf file, following ``include`` globs."""
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "include":
            for pattern in words[1:]:
                if not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(path), pattern)
                for included in sorted(glob.glob(pattern)):
                    _read_ld_so_conf(included, dirs, seen)
        elif words[0] == "hwcap":
            continue
        else:
            for word in re.split(r"[\s,:]+", line):
                directory = word.split("=", 1)[0].rstrip("/")
                if directory.startswith("/"):
                    dirs.append(directory)


_Signature = tuple[tuple[str, tuple[int, int, int] | None], ...]
_cache: dict[tuple[object, ...], tuple[_Signature, RuntimeSet]] = {}


def _signature(paths: Iterable[str]) -> _Signature:
    def sig(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_mtime_ns)

    return tuple((p, sig(p)) for p in paths)


def runtime_set(
    program: str, *, env: Mapping[str, str] | None = None, extra: Sequence[str] = ()
) -> RuntimeSet:
    """The read-only runtime set of ``program`` as it would run with ``env``.

    ``env`` is the program's environment (default: empty): its PATH (default
    ``/usr/local/bin:/usr/bin:/bin``) resolves ``#!/usr/bin/env NAME``, its
    LD_LIBRARY_PATH joins the library search, its LANG/LC_* decide the locale
    tree. ``extra`` (the description's ``runtime:`` list) is added with reason
    ``"runtime (description)"``, kept as written (an executable file among
    them brings its own runtime set, like the program's); it is opened (and a missing
    path reported) only by :func:`~supervisor.landlock.build_ruleset`.

    Results are cached per program path, env and extra, and reused while the
    program, its #! interpreters (stat: inode, device, mtime) and
    /etc/ld.so.cache are unchanged.

    Raises :class:`ProgramNotFound` / :class:`ProgramNotExecutable` for a
    missing or unusable program or interpreter, :class:`ConfinementError` for
    an ELF this reader does not support (not ELF64 little-endian), and
    :class:`ResolveError` (no location) for an ``extra`` path that may never
    be in the runtime set (/, /etc, /home, /root, /tmp, /dev/shm, or /proc and
    anything under it; paths below the others are allowed).
    """
    env = dict(env or {})
    key = (
        os.path.abspath(program),
        env.get("PATH", DEFAULT_PATH),
        env.get("LD_LIBRARY_PATH"),
        _needs_locale(env),
        tuple(extra),
    )
    hit = _cache.get(key)
    if hit is not None and _signature(p for p, _ in hit[0]) == hit[0]:
        return hit[1]
    builder = _Builder(env)
    builder.program(program, reason="program", depth=0)
    builder.devices()
    builder.locale()
    builder.extra(extra)
    result = RuntimeSet(builder.grants(), tuple(builder.unresolved))
    if len(_cache) >= _MAX_CACHE:
        _cache.pop(next(iter(_cache)))
    _cache[key] = (_signature([*builder.chain, LD_SO_CACHE]), result)
    return result


def clear_cache() -> None:
    """Forget every cached runtime set."""
    _cache.clear()
