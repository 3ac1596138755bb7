"""Errors as values with a location.

Every error capvisor reports to a user is a :class:`CapvisorError`. Errors
that come from a file (a program description, a policy) carry one or more
:class:`Problem` values, each with a :class:`Location` (file, line, column),
so that all problems of a file can be reported at once. The CLI and the CRI
layer turn these into messages or gRPC statuses; nothing below them prints.

Exit codes (documented in docs/cli.md) are attached to the error classes so
the CLI does not need a table of its own.
"""

from __future__ import annotations

import errno as errno_module
import os
from collections.abc import Iterable
from dataclasses import dataclass

#: Exit code for errors capvisor itself detects (bad description, policy,
#: capability, confinement); as in env(1) and timeout(1).
EXIT_CAPVISOR = 125
#: The program exists but cannot be executed.
EXIT_CANNOT_EXECUTE = 126
#: The program does not exist.
EXIT_NOT_FOUND = 127


@dataclass(frozen=True, order=True)
class Location:
    """A place in a source file; line and column count from 1."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, at a location when one is known."""

    location: Location | None
    message: str

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        return f"{self.location}: {self.message}"


class CapvisorError(Exception):
    """Base class of every error meant for the user (never a bug)."""

    exit_code: int = EXIT_CAPVISOR


class ProblemsError(CapvisorError):
    """An input with one or more problems, all reported together."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = sorted(
            problems, key=lambda p: (p.location is None, p.location or Location("", 0, 0))
        )
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, location: Location | None, message: str) -> ProblemsError:
        """An error with just one problem."""
        return cls([Problem(location, message)])


class DescriptionError(ProblemsError):
    """A program description is malformed or inconsistent."""


class PolicyError(ProblemsError):
    """A seccomp policy is malformed or cannot be compiled."""


class ResolveError(CapvisorError):
    """A capability could not be turned into a file descriptor."""

    def __init__(self, location: Location | None, message: str) -> None:
        self.location = location
        self.message = message
        super().__init__(str(Problem(location, message)))


class ConfinementError(CapvisorError):
    """A confinement layer that was asked for cannot be applied here."""


class ProgramNotFound(CapvisorError):
    """The program named by a description does not exist."""

    exit_code = EXIT_NOT_FOUND


class ProgramNotExecutable(CapvisorError):
    """The program exists but is not an executable regular file."""

    exit_code = EXIT_CANNOT_EXECUTE


def errno_name(number: int) -> str:
    """``EACCES`` for 13; ``errno 999`` for numbers with no name."""
    return errno_module.errorcode.get(number, f"errno {number}")


class SpawnError(CapvisorError):
    """The native helper failed at one step of the child setup.

    ``step`` is the name of the step (``"landlock"``, ``"execve"``, ...),
    ``errno`` the error number the child saw there.
    """

    def __init__(self, step: str, errno: int, program: str | None = None) -> None:
        self.step = step
        self.errno = errno
        self.program = program
        where = f" ({program})" if program else ""
        super().__init__(
            f"spawn failed at {step}{where}: {errno_name(errno)} ({os.strerror(errno)})"
        )
        if step == "execve" and errno == errno_module.ENOENT:
            self.exit_code = EXIT_NOT_FOUND
        elif step == "execve" and errno in (errno_module.EACCES, errno_module.ENOEXEC):
            self.exit_code = EXIT_CANNOT_EXECUTE
