"""Every error adpredict raises on purpose, in one tree.

    AdpredictError                 base; ``str()`` is a message meant for a person
    ├── SchemaError                a schema file or dict is malformed
    ├── DataError                  a data file, row or directory is unusable
    ├── ModelError                 a model cannot be trained, exported or loaded, or a
    │                              served version failed on a batch (INTERNAL)
    │   └── ModelNotFoundError     no such model (or version) under the model dir
    ├── StartupError               the server cannot start (options, port in use, model dir)
    └── RequestError               a prediction request is bad (serving side)
        ├── InvalidRequestError    the caller sent something malformed
        ├── OverloadedError        the queue is full; retry elsewhere or later
        └── DeadlineError          the request cannot be (or was not) answered in time

Command-line tools print ``str(error)`` and exit non-zero; the gRPC service maps each
``RequestError`` subclass to exactly one status code in ``adpredict.serving.status``.
"""

from __future__ import annotations


class AdpredictError(Exception):
    """Base class for errors adpredict raises deliberately."""


class SchemaError(AdpredictError):
    """A feature schema is malformed (unknown kind, duplicate field, bad bucket count...)."""


class DataError(AdpredictError):
    """Training data is unusable: missing directory, bad header, corrupt shard, bad label."""


class ModelError(AdpredictError):
    """A model cannot be trained, exported or loaded, or a loaded version rejected a batch
    (a server fault: the requests were validated before they were merged)."""


class ModelNotFoundError(ModelError):
    """The requested model name or version does not exist."""


class StartupError(AdpredictError):
    """The server cannot start: bad options, a port in use, a missing model directory."""


class RequestError(AdpredictError):
    """A prediction request failed; subclasses say why."""


class InvalidRequestError(RequestError):
    """The request is malformed; the message names the offending field."""


class OverloadedError(RequestError):
    """The server's queue is full; the request was refused at admission."""


class DeadlineError(RequestError):
    """The request's deadline cannot be met, or passed while it waited."""
