"""The one place where errors become gRPC status codes (and, for clients, errors again).

    InvalidRequestError   INVALID_ARGUMENT    the caller's fault; details name the field
    ModelNotFoundError    NOT_FOUND           no such model is served
    OverloadedError       RESOURCE_EXHAUSTED  queue full or shutting down; retry elsewhere
    DeadlineError         DEADLINE_EXCEEDED   cannot be, or was not, answered in time
    anything else         INTERNAL            details "<ExceptionType>: <message>"; the traceback
                                              is logged on the server, never sent

Details are ``str(error)``, cut to ``MAX_DETAILS_CHARS`` (they travel in a trailer). Clients
turn a status back into the matching ``adpredict.errors`` class with ``error_for_status``.
"""

from __future__ import annotations

import logging

import grpc

from adpredict.errors import (
    AdpredictError,
    DeadlineError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
)

__all__ = ["MAX_DETAILS_CHARS", "error_for_status", "status_for"]

logger = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1000

# Checked in order; the first matching class wins (no class here subclasses another).
_CODES: tuple[tuple[type[AdpredictError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def _cut(text: str) -> str:
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return text[: MAX_DETAILS_CHARS - 3] + "..."


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details for ``error``. Logs the traceback of unexpected errors."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, _cut(str(error) or cls.__name__)
    logger.error("internal error answering a request", exc_info=error)
    message = str(error)
    details = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return grpc.StatusCode.INTERNAL, _cut(details)


def error_for_status(code: grpc.StatusCode, details: str) -> AdpredictError:
    """The inverse mapping, for clients: a status back into an ``adpredict.errors`` instance.

    Codes outside the table (INTERNAL, UNAVAILABLE, ...) become a plain ``RequestError`` whose
    message starts with the code's name.
    """
    for cls, mapped in _CODES:
        if code == mapped:
            return cls(details)
    return RequestError(f"{code.name}: {details}" if details else code.name)
