"""PredictRequest -> numpy arrays -> one model feed, and probabilities back per request.

``RequestCodec(schema, limits)`` is built once per loaded schema and used from any thread:

* ``decode(request)`` validates a ``PredictRequest`` against the schema and returns a
  ``ParsedRequest``: one ``[1]`` (or ``[1, M]``) object array of bytes per context field and
  one ``[K]`` (or ``[K, M]``) array per candidate field, every schema field present (absent
  fields become ``b''``, the model's missing bucket). It raises ``InvalidRequestError`` whose
  message starts with the offending field, e.g. ``candidates['bid_cpm'][3]: ...``. Everything
  the model could choke on is checked here, so a bad request never reaches a batch.
* ``merge(slices)`` concatenates several parsed requests, or ``Slice``s of them (candidates
  ``start:stop``), into exactly the serving signature's inputs: context ``[R]``/``[R, M]``,
  candidates ``[B]``/``[B, M]`` (multi-valued rows padded with ``b''``) and ``request_index``
  int32 ``[B]`` mapping each candidate row to its slice (``0..R-1``).
* ``split(probabilities, slices)`` cuts the model's ``[B]`` output back into one array per slice.
* ``decode(request, rows=True)`` and ``merge(slices, rows=True)`` do the same for the
  ``serving_rows`` signature: the decoder hashes each value to the model's table row
  (FarmHash Fingerprint64 and the numeric buckets, in C, equal to the graph's own hashing), so
  no bytes object is made per value and the model skips its hashing (32-36% less server CPU
  per prediction at K = 300, docs/BENCHMARKS.md). The servicer uses it when the loaded
  version has that signature and it answered the warm-up as ``serving_default`` did.

The wire layout is columnar (see ``proto/adpredict/v1/prediction_service.proto``), so the work
per request is a fixed number of C-level calls per field; nothing loops over candidates in
Python. Each column's values are checked by ``_scan.scan`` (one C loop: lengths, empties, short
plain decimals) when the extension is built; a column it cannot vouch for, and every column
without it, takes the Python checks (``max(map(len, ...))``, bytes ``translate``/``count`` over
a joined numeric column, a regex only for signs and exponents), which also name the offending
value. Both accept exactly the same requests.

The servers do not build the message at all for a request in the usual shape: their
deserializer (``predict_parser``) reads the three header fields from the bytes (``_wire.header``)
and ``decode`` goes from the bytes straight to the arrays (``_wire.decode``, one C pass:
47 against 103 µs via upb for a K = 300 request in benchmarks/bench_decode.py). Whatever
it does not vouch for (an unusual wire shape, a value the checks might refuse) is parsed by upb
and decoded as above, so errors and results are the same either way. No TensorFlow import: the
runtime owns every TF call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adpredict.errors import InvalidRequestError, ModelError
from adpredict.schema import Field, Schema
from adpredict.serving.batcher import Slice
from adpredict.v1 import prediction_service_pb2 as pb

try:  # the C fast path of the value checks (setup.py builds it; see _scan.c)
    from adpredict.serving._scan import scan as _native_scan
except ImportError:  # no C compiler at install time: the Python checks do it all
    _native_scan = None
try:  # the C fast path from wire bytes to arrays (setup.py builds it; see _wire.c)
    from adpredict.serving import _wire
except ImportError:  # no C compiler or numpy headers at install time: upb + Python do it all
    _wire = None

__all__ = [
    "REQUEST_INDEX",
    "CodecLimits",
    "ParsedRequest",
    "RequestCodec",
    "Undecodable",
    "WireRequest",
    "encode_predict_response",
    "lenient_parser",
    "predict_parser",
    "require_decoded",
]

#: The signature input mapping candidate rows to requests.
REQUEST_INDEX = "request_index"

_F32_MAX = float(np.finfo(np.float32).max)
# What TensorFlow's string-to-number parses and we accept: plain decimal, optional exponent.
_NUMBER = rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)
# A whole column joined with b"\n": every entry a number or empty (missing).
_NUMBERS_RE = re.compile(rb"(?:%s)?(?:\n(?:%s)?)*" % (_NUMBER, _NUMBER))
_PLAIN_CHARS = b"0123456789.\n"
_DIGITS = b"0123456789"
_F32_SAFE_CHARS = 38  # a plain decimal this short is below 1e38, inside float32's range
_SHOWN_BYTES = 40  # how much of a bad value or name an error message quotes


@dataclass(frozen=True)
class CodecLimits:
    """Request limits enforced by ``decode``; both are advertised in GetModelMetadata."""

    max_candidates: int = 1024  # candidates (K) per request
    max_value_bytes: int = 256  # bytes per feature value

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_value_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True, eq=False)
class ParsedRequest:
    """A validated request as arrays; treat the arrays as read-only (some are shared)."""

    size: int  # K, the number of candidates
    context: Mapping[str, Any]  # every context field: [1] or [1, M] (see the layouts below)
    candidates: Mapping[str, Any]  # every candidate field: [K] or [K, M]
    missing: int  # (row, field) cells that were absent or empty, context row included
    fingerprint: str  # of the schema it was validated against
    #: Layout. False: object arrays of bytes, ``[n]`` or ``[n, M]`` (``serving_default``).
    #: True: table rows, int64 ``[n]`` per single-valued field and ``(rows int64, weights
    #: float32)`` ``[n, M + 1]`` per multi-valued field (``serving_rows``).
    rows: bool = False
    #: Rows layout only: the request it was decoded from, decoded again as strings if its batch
    #: goes to a version without ``serving_rows`` (a hot swap while it waited).
    request: Any = None


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What ``lenient_parser`` returns for bytes that are not a valid message of its type."""

    message_type: str  # full protobuf name, e.g. "adpredict.v1.PredictRequest"
    size: int  # bytes received
    reason: str  # the protobuf parser's message


def lenient_parser(message_class: Any) -> Callable[[bytes], Any]:
    """A gRPC request deserializer that never raises: a message, or ``Undecodable``.

    gRPC answers a deserializer's exception with UNKNOWN, blaming nobody; with this, the
    servicer can answer INVALID_ARGUMENT instead (``require_decoded``). Garbage bytes and
    invalid UTF-8 in a ``string`` field (``model``, ``request_id``) are what protobuf refuses.
    """
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, or anything else the C parser raises
            return Undecodable(name, len(data), str(exc) or type(exc).__name__)

    return parse


_parse_predict = lenient_parser(pb.PredictRequest)  # the one PredictRequest parser


@dataclass(frozen=True, slots=True)
class WireRequest:
    """A ``PredictRequest`` still in its wire bytes (``predict_parser``): the three fields the
    servicer reads before decoding, and the bytes that ``RequestCodec.decode`` turns into
    arrays without building the message."""

    request_id: str
    model: str
    num_candidates: int
    data: bytes


def predict_parser() -> Callable[[bytes], Any]:
    """The Predict deserializer: a ``WireRequest`` for bytes in the usual shape (``_wire.c``),
    else what ``lenient_parser(PredictRequest)`` returns (a message or ``Undecodable``).

    Without the ``_wire`` extension it is ``lenient_parser`` alone.
    """
    parse = _parse_predict
    if _wire is None:
        return parse
    header = _wire.header

    def parse_wire(data: bytes) -> Any:
        head = header(data)
        return parse(data) if head is None else WireRequest(*head, data)

    return parse_wire


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer below 2**64."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text_field(tag: bytes, value: str) -> bytes:
    data = value.encode("utf-8")
    return tag + _varint(len(data)) + data if data else b""


def _int_field(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""


def encode_predict_response(
    *,
    request_id: str,
    probabilities: np.ndarray,
    model: str,
    model_version: int,
    queue_us: int,
    compute_us: int,
    batch_predictions: int,
    batch_requests: int,
) -> bytes:
    """A serialized ``PredictResponse``, the same bytes ``SerializeToString`` makes.

    The probabilities (float32 ``[K]``) are copied as one packed block: no Python float per
    candidate and no message object. Integers must be in their field's range (non-negative;
    ``model_version`` below 2**63).
    """
    packed = np.ascontiguousarray(probabilities, dtype="<f4").tobytes()
    return b"".join(
        (
            _text_field(b"\x0a", request_id),
            b"\x12" + _varint(len(packed)) + packed if packed else b"",
            _text_field(b"\x1a", model),
            _int_field(b"\x20", model_version),
            _int_field(b"\x28", queue_us),
            _int_field(b"\x30", compute_us),
            _int_field(b"\x38", batch_predictions),
            _int_field(b"\x40", batch_requests),
        )
    )


def require_decoded(request: Any) -> None:
    """``InvalidRequestError`` (field ``request``) if ``request`` is ``Undecodable``."""
    if isinstance(request, Undecodable):
        reason = request.reason.removeprefix(
            f"Error parsing message with type '{request.message_type}': "
        )
        if "UTF-8" in reason:
            reason += ": string fields (model, request_id) must be UTF-8 text"
        raise InvalidRequestError(
            f"request: the {request.size} bytes received are not a valid {request.message_type} "
            f"message ({reason[:200]})"
        )


def _show(value: bytes | str) -> str:
    """A bounded repr for error messages (names and values come from the caller)."""
    if len(value) > _SHOWN_BYTES:
        return repr(value[:_SHOWN_BYTES]) + f"... ({len(value)} long)"
    return repr(value)


def _plain_decimals(joined: bytes) -> bool:
    """Whether every ``\\n``-separated entry of ``joined`` is empty or digits with at most one
    ``.`` and at least one digit. C-level bytes operations only: no per-value Python work."""
    if joined.translate(None, _PLAIN_CHARS):  # a sign, an exponent or a foreign byte
        return False
    if b".." in joined.translate(None, _DIGITS):  # two dots within one entry
        return False
    return not (
        joined == b"." or joined.startswith(b".\n") or joined.endswith(b"\n.") or b"\n.\n" in joined
    )


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _object_array(values: list[bytes]) -> np.ndarray:
    return np.fromiter(values, dtype=object, count=len(values))  # no per-item shape discovery


class RequestCodec:
    """Validates ``PredictRequest``s for one schema and merges them into model feeds."""

    def __init__(self, schema: Schema, limits: CodecLimits | None = None) -> None:
        """Uses the C fast paths (``_scan``, ``_wire``) that are built, as imported now."""
        self.schema = schema
        self.fingerprint = schema.fingerprint()
        self._context = {f.name: f for f in schema.context_fields}
        self._candidate = {f.name: f for f in schema.candidate_fields}
        # One shared read-only row per context field for "absent": the common case costs nothing.
        self._absent_context = {
            f.name: _readonly(np.full((1, 1) if f.is_multi else (1,), b"", dtype=object))
            for f in schema.context_fields
        }
        self._scan = _native_scan
        self.limits = limits if limits is not None else CodecLimits()
        self._wire_plan = (
            _wire.Plan(
                [self._plan_field(f) for f in schema.context_fields],
                [self._plan_field(f) for f in schema.candidate_fields],
                self.limits.max_value_bytes,
            )
            if _wire is not None
            else None
        )
        self._offsets = schema.offsets()  # each field's first row in the shared table
        fields = (*schema.context_fields, *schema.candidate_fields)
        self._field_index = {f.name: i for i, f in enumerate(fields)}  # in the plan
        self._single_context = [f.name for f in schema.context_fields if not f.is_multi]
        self._single_candidates = [f.name for f in schema.candidate_fields if not f.is_multi]
        # The same checks, writing table rows instead of bytes objects (FarmHash and the
        # numeric buckets in C, equal to the graph's: tests/serving/test_codec_rows.py).
        self._rows_plan = (
            _wire.Plan(
                [self._plan_field(f) for f in schema.context_fields],
                [self._plan_field(f) for f in schema.candidate_fields],
                self.limits.max_value_bytes,
                [
                    (f.buckets, self._offsets[f.name], list(f.boundaries) if f.is_numeric else [])
                    for f in fields
                ],
            )
            if _wire is not None
            else None
        )

    @property
    def can_decode_rows(self) -> bool:
        """Whether ``decode(..., rows=True)`` works: it hashes in ``_wire`` (when built)."""
        return self._rows_plan is not None

    # ------------------------------------------------------------------------------ decode

    def _plan_field(self, field: Field) -> tuple[bytes, int, int, np.ndarray | None]:
        kind = 1 if field.is_multi else 2 if field.is_numeric else 0
        absent = self._absent_context.get(field.name) if field.scope == "context" else None
        return field.name.encode("ascii"), kind, field.max_values, absent

    def decode(self, request: Any, *, rows: bool = False) -> ParsedRequest:
        """Validate ``request`` (a ``PredictRequest`` or ``WireRequest``), return its arrays.

        A ``WireRequest`` goes from its bytes to the arrays in C when ``_wire.decode`` vouches
        for it; otherwise (or without the extension) it is parsed by upb and decoded here.
        ``rows``: return the rows layout (see ``ParsedRequest``); the checks and errors are the
        same, and a request ``_wire`` does not vouch for is decoded as strings, then hashed.
        """
        k = request.num_candidates
        self._check_size(k)
        if not rows:
            return self._decode_strings(request, k)
        if self._rows_plan is None:
            raise RuntimeError("decoding to table rows needs adpredict.serving._wire (not built)")
        if isinstance(request, WireRequest):
            arrays = _wire.decode(request.data, self._rows_plan, k)
            if arrays is not None:
                return ParsedRequest(k, *arrays, self.fingerprint, rows=True, request=request)
        return self._to_rows(self._decode_strings(request, k), request)

    def _decode_strings(self, request: Any, k: int) -> ParsedRequest:
        if isinstance(request, WireRequest):
            if self._wire_plan is not None:
                arrays = _wire.decode(request.data, self._wire_plan, k)
                if arrays is not None:
                    return ParsedRequest(k, *arrays, self.fingerprint)
            request = _parse_predict(request.data)
            require_decoded(request)  # (_wire.header checked the structure: should not fail)
        return self._decode_message(request, k)

    def _to_rows(self, parsed: ParsedRequest, request: Any) -> ParsedRequest:
        """``parsed`` (strings layout) in the rows layout: the rows ``_wire.decode`` makes.

        Python loops over the values: only for what the C decoder does not vouch for (upb
        messages, unusual wire shapes) and for requests decoded before a hot swap.
        """
        context = {n: self._value_rows(self._context[n], a) for n, a in parsed.context.items()}
        candidates = {
            n: self._value_rows(self._candidate[n], a) for n, a in parsed.candidates.items()
        }
        return ParsedRequest(
            parsed.size,
            context,
            candidates,
            parsed.missing,
            parsed.fingerprint,
            rows=True,
            request=request,
        )

    def _value_rows(self, field: Field, values: np.ndarray) -> Any:
        """One field's values (object array of bytes) as table rows, hashed by ``_wire``'s
        own code for them (``field_rows``), so this path and ``_wire.decode`` agree."""
        index = self._field_index[field.name]
        if field.is_multi:  # b"" only pads a multi-valued row (the checks refuse empty values)
            rows = [[v for v in row if v] for row in values.tolist()]
            return _wire.field_rows(self._rows_plan, index, rows)
        return _wire.field_rows(self._rows_plan, index, values.tolist())

    def _check_size(self, k: int) -> None:
        if k < 1:
            raise InvalidRequestError(
                "num_candidates: the request has no candidates (must be >= 1)"
            )
        if k > self.limits.max_candidates:
            raise InvalidRequestError(
                f"num_candidates: {k} candidates, more than this server's limit of "
                f"{self.limits.max_candidates}; split the request"
            )

    def _decode_message(self, request: Any, k: int) -> ParsedRequest:
        missing = 0
        # Driven by the schema, with C-level map lookups (iterating a upb map's items() runs
        # Python code per entry); whatever was not looked up is an unknown field.
        sent = request.context
        found = 0
        context: dict[str, np.ndarray] = {}
        for name, field in self._context.items():
            entry = sent.get(name)
            if entry is None:
                context[name] = self._absent_context[name]
                missing += 1
            else:
                found += 1
                context[name], n_missing = self._decode_context(field, entry.values[:])
                missing += n_missing
        if found != len(sent):
            raise self._unknown("context", next(n for n in sent if n not in self._context))
        columns = request.candidates
        found = 0
        candidates: dict[str, np.ndarray] = {}
        for name, field in self._candidate.items():
            column = columns.get(name)
            if column is None:
                shape = (k, 1) if field.is_multi else (k,)
                candidates[name] = np.full(shape, b"", dtype=object)
                missing += k
            else:
                found += 1
                candidates[name], n_missing = self._decode_column(
                    field, k, column.values[:], column.counts
                )
                missing += n_missing
        if found != len(columns):
            raise self._unknown("candidates", next(n for n in columns if n not in self._candidate))
        return ParsedRequest(k, context, candidates, missing, self.fingerprint)

    def _unknown(self, where: str, name: str) -> InvalidRequestError:
        other, other_where = (
            (self._candidate, "candidates") if where == "context" else (self._context, "context")
        )
        scope = "candidate" if where == "context" else "context"
        if name in other:
            return InvalidRequestError(
                f"{where}[{_show(name)}]: wrong kind: a {scope} field; send it in {other_where}"
            )
        expected = self._context if where == "context" else self._candidate
        return InvalidRequestError(
            f"{where}[{_show(name)}]: unknown field; schema {self.schema.name!r} has "
            f"{where} fields {sorted(expected)}"
        )

    def _decode_context(self, field: Field, values: list[bytes]) -> tuple[np.ndarray, int]:
        where = f"context[{field.name!r}]"
        n = len(values)
        if field.is_multi:
            if n > field.max_values:
                raise InvalidRequestError(
                    f"{where}: {n} values, more than max_values={field.max_values}"
                )
            self._check(where, values, allow_empty=False, numeric=False)
            if n == 0:
                return self._absent_context[field.name], 1
            row = np.empty((1, n), dtype=object)
            row[0, :] = values
            return row, 0
        if n > 1:
            raise InvalidRequestError(
                f"{where}: wrong kind: {n} values for a single-valued {field.kind} field "
                f"(send 0 or 1)"
            )
        if n == 0 or not values[0]:
            return self._absent_context[field.name], 1
        self._check(where, values, allow_empty=False, numeric=field.is_numeric, indexed=False)
        return _object_array(values), 0

    def _decode_column(
        self, field: Field, k: int, values: list[bytes], counts: Sequence[int]
    ) -> tuple[np.ndarray, int]:
        where = f"candidates[{field.name!r}]"
        if not field.is_multi:
            if counts:
                raise InvalidRequestError(
                    f"{where}: wrong kind: counts given for a single-valued {field.kind} field "
                    f"(send one value per candidate and no counts)"
                )
            if len(values) != k:
                raise InvalidRequestError(
                    f"{where}: {len(values)} values for {k} candidates (one value per candidate; "
                    f"'' for missing)"
                )
            empty = self._check(where, values, allow_empty=True, numeric=field.is_numeric)
            return _object_array(values), empty
        if not counts and not values:
            return np.full((k, 1), b"", dtype=object), k
        counts = counts[:]
        if len(counts) != k:
            raise InvalidRequestError(
                f"{where}: {len(counts)} counts for {k} candidates (a multi-valued column needs "
                f"one count per candidate)"
            )
        per_row = np.array(counts, dtype=np.int64)
        widest = int(per_row.max())
        if widest > field.max_values:
            i = int(per_row.argmax())
            raise InvalidRequestError(
                f"{where}[{i}]: {widest} values, more than max_values={field.max_values}"
            )
        total = int(per_row.sum())
        if total != len(values):
            raise InvalidRequestError(
                f"{where}: counts sum to {total} but {len(values)} values were sent"
            )
        ends = np.cumsum(per_row)
        self._check(where, values, allow_empty=False, numeric=False, row_ends=ends)
        out = np.full((k, max(widest, 1)), b"", dtype=object)
        starts = ends - per_row
        rows = np.repeat(np.arange(k), per_row)
        cols = np.arange(total) - np.repeat(starts, per_row)
        out[rows, cols] = _object_array(values)
        return out, int(np.count_nonzero(per_row == 0))

    def _check(
        self,
        where: str,
        values: list[bytes],
        *,
        allow_empty: bool,
        numeric: bool,
        indexed: bool = True,
        row_ends: np.ndarray | None = None,
    ) -> int:
        """Every value checked (see ``_check_values``, ``_check_numbers``); the empties counted.

        The C scan settles a column that certainly passes; any other (too long, empty where not
        allowed, a number it does not vouch for) goes to the Python checks, which raise with
        the offending value's position or accept it (e.g. ``1e5``).
        """
        if self._scan is not None:
            empty = self._scan(values, self.limits.max_value_bytes, allow_empty, numeric)
            if empty >= 0:
                return empty
        self._check_values(
            where, values, allow_empty=allow_empty, indexed=indexed, row_ends=row_ends
        )
        if numeric:
            self._check_numbers(where, values, indexed=indexed)
        return values.count(b"") if allow_empty else 0

    def _check_values(
        self,
        where: str,
        values: list[bytes],
        *,
        allow_empty: bool,
        indexed: bool = True,
        row_ends: np.ndarray | None = None,
    ) -> None:
        """Length limit, and no empty values where they are not allowed. C-level unless bad.

        Errors name ``where[i]`` (value i) if ``indexed``, ``where[c]`` (candidate c owning the
        value) given the candidates' cumulative ``row_ends``, else just ``where``.
        """
        limit = self.limits.max_value_bytes
        too_long = max(map(len, values), default=0) > limit
        empty = not allow_empty and b"" in values
        if not (too_long or empty):
            return
        for i, value in enumerate(values):
            if row_ends is not None:
                at = f"{where}[{int(np.searchsorted(row_ends, i, side='right'))}]"
            else:
                at = f"{where}[{i}]" if indexed else where
            if len(value) > limit:
                raise InvalidRequestError(
                    f"{at}: value of {len(value)} bytes, more than the limit of {limit} "
                    f"({_show(value)})"
                )
            if not value and not allow_empty:
                raise InvalidRequestError(
                    f"{at}: empty value in a multi-valued field (leave it out instead)"
                )

    def _check_numbers(self, where: str, values: list[bytes], *, indexed: bool = True) -> None:
        """Each non-empty value a finite decimal within float32 range, as the model parses it.

        TensorFlow's parser fails the whole batch on a malformed number, so this must be exact.
        Plain decimals (``12``, ``1.25``) are checked with bytes operations only; signs and
        exponents take a regex, and only long or exponent values are converted to floats.
        """
        if not values:
            return
        joined = b"\n".join(values)
        if joined.count(b"\n") == len(values) - 1:  # no value hides a separator
            if _plain_decimals(joined):
                if max(map(len, values)) <= _F32_SAFE_CHARS:
                    return
                syntax_ok = True
            else:
                syntax_ok = _NUMBERS_RE.fullmatch(joined) is not None
            if syntax_ok and max(map(abs, map(float, filter(None, values)))) <= _F32_MAX:
                return
        for i, value in enumerate(values):
            if value and (_NUMBER_RE.fullmatch(value) is None or abs(float(value)) > _F32_MAX):
                raise InvalidRequestError(
                    f"{f'{where}[{i}]' if indexed else where}: {_show(value)} is not a finite "
                    f"decimal number (e.g. b'1.25'; |x| <= 3.4e38; no spaces, inf or nan)"
                )
        raise AssertionError("unreachable: the column failed validation as a whole")

    # ------------------------------------------------------------------------------- merge

    def merge(
        self, parts: Sequence[Slice[ParsedRequest] | ParsedRequest], *, rows: bool = False
    ) -> dict[str, np.ndarray]:
        """One feed (the signature's inputs) for ``parts``, in order: row r of every context
        input and ``request_index == r`` belong to ``parts[r]``.

        ``rows``: the ``serving_rows`` feed, else ``serving_default``'s. A part decoded in the
        other layout (the model was swapped while it waited) is hashed (strings to rows) or
        decoded again from its request (rows to strings).
        """
        if not parts:
            raise ValueError("merge needs at least one request")
        slices = [p if isinstance(p, Slice) else Slice(p, 0, p.size) for p in parts]
        for s in slices:
            if s.payload.fingerprint != self.fingerprint:
                raise ModelError(
                    f"a request validated against schema fingerprint {s.payload.fingerprint} "
                    f"reached a model with schema fingerprint {self.fingerprint}"
                )
            if not 0 <= s.start < s.stop <= s.payload.size:
                raise ValueError(f"slice {s.start}:{s.stop} of a request of {s.payload.size}")
        if rows:
            return self._merge_rows(
                [
                    s if s.payload.rows else Slice(self._to_rows(s.payload, None), s.start, s.stop)
                    for s in slices
                ]
            )
        slices = [
            Slice(self._decode_strings(s.payload.request, s.payload.size), s.start, s.stop)
            if s.payload.rows
            else s
            for s in slices
        ]
        feed: dict[str, np.ndarray] = {}
        for name, field in self._context.items():
            feed[name] = _stack([s.payload.context[name] for s in slices], field.is_multi)
        whole = (
            len(slices) == 1 and slices[0].start == 0 and slices[0].stop == slices[0].payload.size
        )
        for name, field in self._candidate.items():
            if whole:
                feed[name] = slices[0].payload.candidates[name]
            else:
                feed[name] = _stack(
                    [s.payload.candidates[name][s.start : s.stop] for s in slices], field.is_multi
                )
        sizes = [s.stop - s.start for s in slices]
        feed[REQUEST_INDEX] = np.repeat(np.arange(len(slices), dtype=np.int32), sizes)
        return feed

    def rows_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A ``serving_default`` feed (e.g. a warm-up feed) as the same ``serving_rows`` feed."""
        size = len(feed[REQUEST_INDEX])
        parsed = ParsedRequest(
            size,
            {n: feed[n] for n in self._context},
            {n: feed[n] for n in self._candidate},
            0,
            self.fingerprint,
        )
        requests = len(feed[self.schema.context_fields[0].name]) if self._context else 1
        out = self._merge_rows([Slice(self._to_rows(parsed, None), 0, size)], requests)
        out[REQUEST_INDEX] = feed[REQUEST_INDEX]
        return out

    def _merge_rows(
        self, slices: list[Slice[ParsedRequest]], context_rows: int | None = None
    ) -> dict[str, np.ndarray]:
        """The ``serving_rows`` feed (``model.export.rows_input_signature``) for rows slices
        (``context_rows``: how many context rows they hold; default one per slice).

        Multi-valued rows of different widths are padded to the widest with the field's
        padding row and weight 0, which the graph's weighted sum ignores.
        """
        context = [s.payload.context for s in slices]
        candidates = [
            {n: _cut(a, s.start, s.stop) for n, a in s.payload.candidates.items()} for s in slices
        ]
        sizes = [s.stop - s.start for s in slices]
        n_context = len(slices) if context_rows is None else context_rows
        feed: dict[str, np.ndarray] = {
            "context_rows": _columns(context, self._single_context, n_context),
            "candidate_rows": _columns(candidates, self._single_candidates, sum(sizes)),
        }
        for parts, fields in ((context, self._context), (candidates, self._candidate)):
            for name, field in fields.items():
                if field.is_multi:
                    feed[f"{name}_rows"], feed[f"{name}_weights"] = _pad_rows(
                        [p[name] for p in parts], self._offsets[name]
                    )
        feed[REQUEST_INDEX] = np.repeat(np.arange(len(slices), dtype=np.int32), sizes)
        return feed

    @staticmethod
    def split(
        probabilities: np.ndarray, parts: Sequence[Slice[Any] | ParsedRequest]
    ) -> list[np.ndarray]:
        """Cut the model's ``[B]`` output into one array per part of the merged feed."""
        sizes = [p.stop - p.start if isinstance(p, Slice) else p.size for p in parts]
        if probabilities.shape != (sum(sizes),):
            raise ModelError(
                f"the model returned shape {probabilities.shape} for {sum(sizes)} candidates"
            )
        return np.split(probabilities, np.cumsum(sizes)[:-1])


def _cut(column: Any, start: int, stop: int) -> Any:
    """Candidates ``start:stop`` of a rows-layout column (an array, or (rows, weights))."""
    if isinstance(column, tuple):
        return column[0][start:stop], column[1][start:stop]
    return column[start:stop]


def _columns(parts: list[Mapping[str, Any]], names: list[str], n: int) -> np.ndarray:
    """int64 ``[n, len(names)]``: the single-valued rows of ``names``, parts one after another."""
    out = np.empty((n, len(names)), np.int64)
    for j, name in enumerate(names):
        np.concatenate([p[name] for p in parts], out=out[:, j])
    return out


def _pad_rows(
    pairs: list[tuple[np.ndarray, np.ndarray]], pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (rows, weights) blocks, padded to the widest with row ``pad``, weight 0."""
    width = max(r.shape[1] for r, _ in pairs)
    n = sum(len(r) for r, _ in pairs)
    rows = np.full((n, width), pad, np.int64)
    weights = np.zeros((n, width), np.float32)
    at = 0
    for r, w in pairs:
        rows[at : at + len(r), : r.shape[1]] = r
        weights[at : at + len(r), : w.shape[1]] = w
        at += len(r)
    return rows, weights


def _stack(arrays: list[np.ndarray], multi: bool) -> np.ndarray:
    """Concatenate rows; multi-valued ``[n, M_i]`` blocks are padded with ``b''`` to the widest."""
    if len(arrays) == 1:
        return arrays[0]
    if not multi:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    if all(a.shape[1] == width for a in arrays):
        return np.concatenate(arrays)
    out = np.full((sum(len(a) for a in arrays), width), b"", dtype=object)
    row = 0
    for a in arrays:
        out[row : row + len(a), : a.shape[1]] = a
        row += len(a)
    return out
