"""Feature schemas: which raw fields a model reads and how each is hashed.

A schema is a small, human-edited TOML (or JSON) file::

    name = "rtb"
    version = 1

    [[fields]]
    name = "site_domain"      # lower-case identifier, unique in the schema
    scope = "context"         # "context": once per bid request; "candidate": once per ad
    kind = "categorical"      # "categorical" | "multi_categorical" | "numeric"
    buckets = 524288          # hash buckets, including bucket 0 = "missing"

``multi_categorical`` fields (user segments) carry up to ``max_values`` values per
row; ``numeric`` fields carry decimal strings bucketized by ``boundaries`` (their
bucket count is ``len(boundaries) + 2``: missing, below the first edge, ... above the
last). Every value on the wire and on disk is a string; an empty string (or an absent
field) means "missing" and maps to the field's bucket 0.

The schema is stored in every data set manifest and exported model, and serving
compares fingerprints so that a model is only ever fed the features it was trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from adpredict.errors import SchemaError

SCOPES = ("context", "candidate")
KINDS = ("categorical", "multi_categorical", "numeric")
#: Names that data files and the serving signature use for themselves.
RESERVED_NAMES = frozenset({"label", "true_ctr", "request_index", "probability"})
BUILTIN_SCHEMAS = ("rtb", "criteo")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MAX_BUCKETS = 1 << 28
_DEFAULT_MAX_VALUES = 16


@dataclass(frozen=True)
class Field:
    """One raw feature: its name, scope, kind and hash-bucket count."""

    name: str
    scope: str
    kind: str
    buckets: int
    boundaries: tuple[float, ...] = ()
    max_values: int = 1
    description: str = ""

    @property
    def is_multi(self) -> bool:
        return self.kind == "multi_categorical"

    @property
    def is_numeric(self) -> bool:
        return self.kind == "numeric"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "scope": self.scope,
            "kind": self.kind,
            "buckets": self.buckets,
        }
        if self.is_numeric:
            out["boundaries"] = list(self.boundaries)
        if self.is_multi:
            out["max_values"] = self.max_values
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Schema:
    """An ordered set of fields; context fields first, then candidate fields."""

    name: str
    version: int
    fields: tuple[Field, ...]
    _by_name: dict[str, Field] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.fields})

    @property
    def context_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.scope == "context")

    @property
    def candidate_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.scope == "candidate")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def total_buckets(self) -> int:
        return sum(f.buckets for f in self.fields)

    def offsets(self) -> dict[str, int]:
        """First row of each field's range in a model's single shared table."""
        out, start = {}, 0
        for f in self.fields:
            out[f.name] = start
            start += f.buckets
        return out

    def field(self, name: str) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise SchemaError(f"schema {self.name!r} has no field {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "fields": [f.to_dict() for f in self.fields],
        }

    def fingerprint(self) -> str:
        """A short hash of everything that changes how features are hashed."""
        canon = {
            "fields": [
                {k: v for k, v in f.to_dict().items() if k != "description"} for f in self.fields
            ]
        }
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "schema") -> Schema:
        """Validate ``raw`` (parsed TOML/JSON) and build a schema; errors name the field."""
        if not isinstance(raw, dict):
            raise SchemaError(f"{source}: expected a table at top level, got {type(raw).__name__}")
        unknown = set(raw) - {"name", "version", "fields", "description"}
        if unknown:
            raise SchemaError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaError(f"{source}: 'name' must be a non-empty string")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SchemaError(f"{source}: 'version' must be a positive integer, got {version!r}")
        raw_fields = raw.get("fields")
        if not isinstance(raw_fields, list) or not raw_fields:
            raise SchemaError(f"{source}: 'fields' must be a non-empty list of tables")
        fields = [_parse_field(rf, i, source) for i, rf in enumerate(raw_fields)]
        seen: set[str] = set()
        for f in fields:
            if f.name in seen:
                raise SchemaError(f"{source}: field {f.name!r} is defined twice")
            seen.add(f.name)
        if not any(f.scope == "candidate" for f in fields):
            raise SchemaError(f"{source}: at least one field must have scope 'candidate'")
        ordered = tuple(f for f in fields if f.scope == "context") + tuple(
            f for f in fields if f.scope == "candidate"
        )
        return cls(name=name, version=version, fields=ordered)


def _parse_field(raw: Any, index: int, source: str) -> Field:
    where = f"{source}: fields[{index}]"
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: expected a table, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SchemaError(
            f"{where}: 'name' must match {_NAME_RE.pattern} (lower-case identifier), got {name!r}"
        )
    where = f"{source}: field {name!r}"
    if name in RESERVED_NAMES:
        raise SchemaError(f"{where}: the name is reserved ({sorted(RESERVED_NAMES)})")
    allowed = {"name", "scope", "kind", "buckets", "boundaries", "max_values", "description"}
    unknown = set(raw) - allowed
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    scope = raw.get("scope")
    if scope not in SCOPES:
        raise SchemaError(f"{where}: 'scope' must be one of {list(SCOPES)}, got {scope!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SchemaError(f"{where}: unknown kind {kind!r}; expected one of {list(KINDS)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SchemaError(f"{where}: 'description' must be a string")

    boundaries: tuple[float, ...] = ()
    if kind == "numeric":
        rb = raw.get("boundaries")
        if not isinstance(rb, list) or not rb:
            raise SchemaError(f"{where}: numeric fields need a non-empty 'boundaries' list")
        try:
            boundaries = tuple(float(b) for b in rb)
        except (TypeError, ValueError):
            raise SchemaError(f"{where}: 'boundaries' must be numbers, got {rb!r}") from None
        if any(not math.isfinite(b) for b in boundaries) or any(
            b2 <= b1 for b1, b2 in itertools.pairwise(boundaries)
        ):
            raise SchemaError(f"{where}: 'boundaries' must be finite and strictly increasing")
        expected = len(boundaries) + 2
        buckets = raw.get("buckets", expected)
        if buckets != expected:
            raise SchemaError(
                f"{where}: a numeric field with {len(boundaries)} boundaries has "
                f"{expected} buckets (missing + {len(boundaries) + 1} intervals), got {buckets!r}"
            )
    else:
        if "boundaries" in raw:
            raise SchemaError(f"{where}: 'boundaries' only applies to numeric fields")
        buckets = raw.get("buckets")
        if (
            not isinstance(buckets, int)
            or isinstance(buckets, bool)
            or not 2 <= buckets <= _MAX_BUCKETS
        ):
            raise SchemaError(
                f"{where}: 'buckets' must be an integer in [2, {_MAX_BUCKETS}], got {buckets!r}"
            )

    max_values = 1
    if kind == "multi_categorical":
        max_values = raw.get("max_values", _DEFAULT_MAX_VALUES)
        if (
            not isinstance(max_values, int)
            or isinstance(max_values, bool)
            or not 1 <= max_values <= 1024
        ):
            raise SchemaError(
                f"{where}: 'max_values' must be an integer in [1, 1024], got {max_values!r}"
            )
    elif "max_values" in raw:
        raise SchemaError(f"{where}: 'max_values' only applies to multi_categorical fields")
    return Field(name, scope, kind, int(buckets), boundaries, int(max_values), description)


def load_schema(spec: str | Path) -> Schema:
    """Load a built-in schema by name (``rtb``, ``criteo``) or a ``.toml``/``.json`` file."""
    spec_str = str(spec)
    if spec_str in BUILTIN_SCHEMAS:
        text = resources.files("adpredict.schemas").joinpath(f"{spec_str}.toml").read_text()
        return Schema.from_dict(tomllib.loads(text), source=f"built-in schema {spec_str!r}")
    path = Path(spec)
    if not path.is_file():
        raise SchemaError(
            f"schema {spec_str!r}: no such file (built-in schemas: {', '.join(BUILTIN_SCHEMAS)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SchemaError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None
    return Schema.from_dict(raw, source=str(path))


def default_schema() -> Schema:
    """The built-in RTB bid-request schema (12 context + 8 candidate fields)."""
    return load_schema("rtb")
