from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Values(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("values", "counts")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[bytes]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("request_id", "model", "context", "num_candidates", "candidates")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Values
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...
    class CandidatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    context: _containers.MessageMap[str, Values]
    num_candidates: int
    candidates: _containers.MessageMap[str, Column]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., context: _Optional[_Mapping[str, Values]] = ..., num_candidates: _Optional[int] = ..., candidates: _Optional[_Mapping[str, Column]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "probabilities", "model", "model_version", "queue_us", "compute_us", "batch_predictions", "batch_requests")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    model: str
    model_version: int
    queue_us: int
    compute_us: int
    batch_predictions: int
    batch_requests: int
    def __init__(self, request_id: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., batch_predictions: _Optional[int] = ..., batch_requests: _Optional[int] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class FieldSpec(_message.Message):
    __slots__ = ("name", "scope", "kind", "buckets", "max_values", "boundaries", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUES_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: str
    kind: str
    buckets: int
    max_values: int
    boundaries: _containers.RepeatedScalarFieldContainer[float]
    description: str
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[str] = ..., kind: _Optional[str] = ..., buckets: _Optional[int] = ..., max_values: _Optional[int] = ..., boundaries: _Optional[_Iterable[float]] = ..., description: _Optional[str] = ...) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("model", "version", "schema_name", "schema_version", "schema_fingerprint", "fields", "metrics_json", "created", "max_candidates", "max_value_bytes", "models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    schema_name: str
    schema_version: int
    schema_fingerprint: str
    fields: _containers.RepeatedCompositeFieldContainer[FieldSpec]
    metrics_json: str
    created: str
    max_candidates: int
    max_value_bytes: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., schema_name: _Optional[str] = ..., schema_version: _Optional[int] = ..., schema_fingerprint: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[FieldSpec, _Mapping]]] = ..., metrics_json: _Optional[str] = ..., created: _Optional[str] = ..., max_candidates: _Optional[int] = ..., max_value_bytes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...
