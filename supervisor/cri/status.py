"""From capvisor's errors to gRPC status codes.

Handlers raise :class:`CriError` for answers the CRI defines (NotFound for
an unknown id, InvalidArgument naming the request field) and let the
backend's errors through; :func:`status_of` maps every exception to the
code and message the client gets. Only an exception that is not a
:class:`~supervisor.errors.CapvisorError` is a bug (INTERNAL).
"""

from __future__ import annotations

import grpc

from ..errors import CapvisorError, PolicyError, ProblemsError
from ..service import AlreadyExistsError, NotFoundError
from .images import ImageError


class CriError(CapvisorError):
    """An answer with a specific gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def not_found(what: str, ident: str) -> CriError:
    """NotFound for ``what`` (``"container"``, ``"pod sandbox"``) ``ident``."""
    return CriError(grpc.StatusCode.NOT_FOUND, f"{what} {ident!r} not found")


def invalid(field: str, message: str) -> CriError:
    """InvalidArgument naming the request ``field``."""
    return CriError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


def require_id(field: str, value: str) -> str:
    """``value``, or InvalidArgument if the id ``field`` is empty."""
    if not value:
        raise invalid(field, "must not be empty")
    return value


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    match exc:
        case CriError():
            return exc.code, exc.message
        case NotFoundError():
            return grpc.StatusCode.NOT_FOUND, str(exc)
        case AlreadyExistsError():
            return grpc.StatusCode.ALREADY_EXISTS, str(exc)
        case ProblemsError() | PolicyError() | ImageError():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case CapvisorError():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
