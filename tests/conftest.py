"""Shared fixtures: run the real `capvisor` CLI as root and as an unprivileged user.

Every confinement test spawns a real `capvisor run` subprocess whose child
really attempts the forbidden thing. ``as_user`` runs each test twice: as
root (when the suite runs as root) and as uid/gid 65534 through setpriv
(or as the invoking user when the suite itself is unprivileged). Targets the
child attacks are throwaway ones the test made (files in a fresh directory,
processes it started).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

NOBODY = 65534
IS_ROOT = os.geteuid() == 0
PYTHON = sys.executable


@dataclass(frozen=True)
class User:
    """Who runs `capvisor`: ``uid`` None means the test process's own user."""

    name: str
    uid: int | None

    def prefix(self) -> list[str]:
        if self.uid is None:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]

    def own(self, path: Path) -> None:
        """Make ``path`` belong to this user (so it can write there)."""
        if self.uid is not None:
            os.chown(path, self.uid, self.uid)


def _users() -> list[pytest.param]:
    if not IS_ROOT:
        return [
            pytest.param(
                User("root", 0), marks=pytest.mark.skip(reason="the suite is not running as root")
            ),
            pytest.param(User("self", None), id="unprivileged"),
        ]
    return [
        pytest.param(User("root", None), id="root"),
        pytest.param(User("nobody", NOBODY), id="unprivileged"),
    ]


@pytest.fixture(params=_users())
def as_user(request: pytest.FixtureRequest) -> User:
    user: User = request.param
    if user.uid is not None and not _can_import_as(user.uid):
        pytest.skip(
            f"uid {user.uid} cannot import capvisor from {PYTHON} (check directory permissions)"
        )
    return user


_import_checked: dict[int, bool] = {}


def _can_import_as(uid: int) -> bool:
    if uid not in _import_checked:
        probe = subprocess.run(
            [*User("x", uid).prefix(), PYTHON, "-c", "import supervisor._native"],
            capture_output=True,
            cwd="/",
        )
        _import_checked[uid] = probe.returncode == 0
    return _import_checked[uid]


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="capvisor-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def log(self) -> bytes:
        return self.stdout


class Capvisor:
    """Runs `python -m supervisor` as a given user, in a given directory."""

    def __init__(self, user: User, work: Path) -> None:
        self.user = user
        self.work = work

    def describe(self, text: str, name: str = "prog.yaml") -> Path:
        path = self.work / name
        path.write_text(textwrap.dedent(text))
        return path

    def run(
        self,
        description: Path | str,
        *args: str,
        command: str = "run",
        timeout: float = 60,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> Result:
        argv = [*self.user.prefix(), PYTHON, "-m", "supervisor", command, *args, str(description)]
        proc = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            pass_fds=pass_fds,
            env=env,
            stdin=stdin,
            cwd=self.work,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))

    def popen(self, description: Path, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        argv = [*self.user.prefix(), PYTHON, "-m", "supervisor", "run", *args, str(description)]
        return subprocess.Popen(argv, cwd=self.work, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def capvisor(as_user: User, work: Path) -> Capvisor:
    return Capvisor(as_user, work)


_CC_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def cc(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Compile a C program (once per session) into a world-readable directory."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the hostile test programs")
    outdir = Path(tempfile.mkdtemp(prefix="capvisor-cc-"))
    outdir.chmod(0o755)

    def compile_c(name: str, source: str, *flags: str) -> Path:
        key = name + source + " ".join(flags)
        if key not in _CC_CACHE:
            src = outdir / f"{name}.c"
            src.write_text(textwrap.dedent(source))
            binary = outdir / name
            subprocess.run(["gcc", "-O1", "-Wall", "-o", str(binary), str(src), *flags], check=True)
            binary.chmod(0o755)
            _CC_CACHE[key] = binary
        return _CC_CACHE[key]

    yield compile_c
    shutil.rmtree(outdir, ignore_errors=True)
