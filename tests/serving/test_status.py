"""status: the mapping table, in both directions, and what an internal error reveals."""

from __future__ import annotations

import logging

import grpc
import pytest

from adpredict.errors import (
    DataError,
    DeadlineError,
    InvalidRequestError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
)
from adpredict.serving.status import MAX_DETAILS_CHARS, error_for_status, status_for

TABLE = [
    (InvalidRequestError("candidates['bid'][3]: bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError("no model 'x'"), grpc.StatusCode.NOT_FOUND),
    (OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineError("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
]


@pytest.mark.parametrize(("error", "code"), TABLE)
def test_request_errors_map_to_their_code_with_the_message(
    error: Exception, code: grpc.StatusCode
) -> None:
    assert status_for(error) == (code, str(error))


@pytest.mark.parametrize(
    "error",
    [ValueError("boom"), ModelError("corrupt"), DataError("x"), RuntimeError(), KeyError("k")],
)
def test_anything_else_is_internal_with_type_and_message_and_a_logged_traceback(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        raise error
    except Exception as raised:
        with caplog.at_level(logging.ERROR, logger="adpredict.serving.status"):
            code, details = status_for(raised)
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith(type(error).__name__)
    assert str(error) in details
    assert "Traceback" not in details
    assert caplog.records and caplog.records[0].exc_info is not None


def test_details_are_bounded() -> None:
    code, details = status_for(InvalidRequestError("x" * 10_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details) == MAX_DETAILS_CHARS


@pytest.mark.parametrize(("error", "code"), TABLE)
def test_clients_get_the_same_error_class_back(error: Exception, code: grpc.StatusCode) -> None:
    back = error_for_status(code, str(error))
    assert type(back) is type(error)
    assert str(back) == str(error)


def test_other_codes_become_a_plain_request_error_naming_the_code() -> None:
    back = error_for_status(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert type(back) is RequestError
    assert str(back) == "UNAVAILABLE: connection refused"
