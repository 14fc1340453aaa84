"""Schema validation, loading, ordering, offsets and fingerprints (``adpredict.schema``)."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from adpredict.errors import SchemaError
from adpredict.schema import RESERVED_NAMES, Schema, default_schema, load_schema

SMALL_SCHEMA = Path(__file__).parent / "fixtures" / "rtb_small.toml"


def field(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid categorical candidate field, with ``overrides`` applied."""
    raw: dict[str, Any] = {"name": name, "scope": "candidate", "kind": "categorical", "buckets": 8}
    raw.update(overrides)
    return raw


def schema_dict(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "version": 1, "fields": list(fields) or [field("ad")]}


def build(*fields: dict[str, Any]) -> Schema:
    return Schema.from_dict(schema_dict(*fields), source="test.toml")


def schema_error(*fields: dict[str, Any]) -> str:
    with pytest.raises(SchemaError) as info:
        build(*fields)
    return str(info.value)


# ---- built-in schemas ---------------------------------------------------------------------------


def test_rtb_has_12_context_and_8_candidate_fields_and_a_big_table() -> None:
    rtb = load_schema("rtb")
    assert len(rtb.context_fields) == 12
    assert len(rtb.candidate_fields) == 8
    assert rtb.total_buckets >= 2**21
    assert rtb.field("user_segments").is_multi
    assert rtb.field("user_segments").max_values == 16
    bid = rtb.field("bid_cpm")
    assert bid.is_numeric and bid.scope == "candidate"
    assert bid.buckets == len(bid.boundaries) + 2
    assert default_schema() == rtb


def test_criteo_has_13_numeric_and_26_categorical_fields() -> None:
    criteo = load_schema("criteo")
    kinds = [f.kind for f in criteo.fields]
    assert kinds.count("numeric") == 13
    assert kinds.count("categorical") == 26
    assert len(kinds) == 39
    assert {f.scope for f in criteo.fields} == {"candidate"}


@pytest.mark.parametrize("name", ["rtb", "criteo"])
def test_builtin_field_names_are_unique_and_not_reserved(name: str) -> None:
    schema = load_schema(name)
    assert len(set(schema.names)) == len(schema.names)
    assert not set(schema.names) & RESERVED_NAMES


# ---- validation: every error names what is wrong ------------------------------------------------


def test_unknown_kind_names_the_field_and_the_kind() -> None:
    msg = schema_error(field("ad"), field("colour", kind="ordinal"))
    assert "'colour'" in msg and "'ordinal'" in msg and "test.toml" in msg


def test_unknown_scope_names_the_field_and_the_scope() -> None:
    msg = schema_error(field("ad"), field("colour", scope="global"))
    assert "'colour'" in msg and "'global'" in msg


def test_duplicate_name_is_rejected() -> None:
    msg = schema_error(field("ad"), field("colour"), field("ad", buckets=16))
    assert "'ad'" in msg and "twice" in msg


@pytest.mark.parametrize("bad", ["Colour", "1st", "a-b", "", "a b", "x" * 65, 7, None])
def test_bad_name_is_rejected_with_its_position(bad: object) -> None:
    msg = schema_error(field("ad"), field("ok"), field(bad))  # type: ignore[arg-type]
    assert "fields[2]" in msg and repr(bad) in msg


def test_longest_allowed_name_is_accepted() -> None:
    assert build(field("a" * 64)).names == ("a" * 64,)


def test_name_with_a_trailing_newline_is_rejected() -> None:
    # '$' in a regex also matches just before a final '\n'; the check must use fullmatch.
    msg = schema_error(field("ad"), field("site\n"))
    assert "fields[1]" in msg


@pytest.mark.parametrize("reserved", sorted(RESERVED_NAMES))
def test_reserved_name_is_rejected(reserved: str) -> None:
    msg = schema_error(field("ad"), field(reserved))
    assert f"'{reserved}'" in msg and "reserved" in msg


@pytest.mark.parametrize("buckets", [0, 1, (1 << 28) + 1, -5, 2.5, "8", True])
def test_buckets_out_of_range_or_not_an_integer(buckets: object) -> None:
    msg = schema_error(field("ad"), field("colour", buckets=buckets))
    assert "'colour'" in msg and "buckets" in msg and repr(buckets) in msg


@pytest.mark.parametrize("buckets", [2, 1 << 28])
def test_bucket_bounds_are_inclusive(buckets: int) -> None:
    assert build(field("colour", buckets=buckets)).field("colour").buckets == buckets


def test_categorical_without_buckets_is_rejected() -> None:
    raw = field("colour")
    del raw["buckets"]
    assert "'colour'" in schema_error(raw)


@pytest.mark.parametrize(
    "boundaries",
    [[1.0, 1.0, 2.0], [3.0, 2.0], [0.0, float("inf")], [float("nan")], [], ["a"], "1,2"],
)
def test_numeric_boundaries_must_be_finite_and_strictly_increasing(boundaries: object) -> None:
    msg = schema_error(field("bid", kind="numeric", boundaries=boundaries))
    assert "'bid'" in msg and "boundaries" in msg


def test_numeric_field_needs_boundaries() -> None:
    msg = schema_error(field("bid", kind="numeric"))
    assert "'bid'" in msg and "boundaries" in msg


def test_numeric_bucket_count_must_match_boundaries() -> None:
    msg = schema_error(field("bid", kind="numeric", boundaries=[1.0, 2.0, 3.0], buckets=8))
    assert "'bid'" in msg and "5 buckets" in msg and "8" in msg


def test_numeric_bucket_count_defaults_to_boundaries_plus_two() -> None:
    raw = field("bid", kind="numeric", boundaries=[1, 2, 3])
    del raw["buckets"]
    f = build(raw).field("bid")
    assert f.buckets == 5
    assert f.boundaries == (1.0, 2.0, 3.0)
    assert build(field("bid", kind="numeric", boundaries=[1, 2, 3], buckets=5)).field("bid") == f


def test_boundaries_on_a_categorical_field_are_rejected() -> None:
    msg = schema_error(field("colour", boundaries=[1.0]))
    assert "'colour'" in msg and "numeric" in msg


@pytest.mark.parametrize("kind", ["categorical", "numeric"])
def test_max_values_on_a_non_multi_field_is_rejected(kind: str) -> None:
    extra = {"boundaries": [1.0], "buckets": 3} if kind == "numeric" else {}
    msg = schema_error(field("colour", kind=kind, max_values=4, **extra))
    assert "'colour'" in msg and "max_values" in msg and "multi_categorical" in msg


@pytest.mark.parametrize("max_values", [0, 1025, 2.0, True])
def test_max_values_out_of_range(max_values: object) -> None:
    msg = schema_error(field("segs", kind="multi_categorical", max_values=max_values))
    assert "'segs'" in msg and "max_values" in msg


def test_max_values_defaults_to_16_for_multi_fields() -> None:
    assert build(field("segs", kind="multi_categorical")).field("segs").max_values == 16
    assert build(field("ad")).field("ad").max_values == 1


def test_unknown_field_key_is_rejected_and_named() -> None:
    msg = schema_error(field("ad"), field("colour", bukets=8))
    assert "'colour'" in msg and "bukets" in msg


def test_unknown_top_level_key_is_rejected_and_named() -> None:
    raw = schema_dict(field("ad"))
    raw["fileds"] = []
    with pytest.raises(SchemaError, match="fileds"):
        Schema.from_dict(raw)


@pytest.mark.parametrize(
    ("key", "value"), [("name", ""), ("version", 0), ("version", True), ("fields", [])]
)
def test_bad_top_level_values(key: str, value: object) -> None:
    raw = schema_dict(field("ad"))
    raw[key] = value
    with pytest.raises(SchemaError, match=key):
        Schema.from_dict(raw)


def test_a_schema_needs_a_candidate_field() -> None:
    msg = schema_error(field("site", scope="context"))
    assert "candidate" in msg


def test_unknown_field_lookup_names_schema_and_field() -> None:
    with pytest.raises(SchemaError, match=r"'t'.*'nope'"):
        build(field("ad")).field("nope")


# ---- loading files ------------------------------------------------------------------------------


def test_toml_and_json_files_load_identically(tmp_path: Path) -> None:
    raw = tomllib.loads(SMALL_SCHEMA.read_text())
    json_path = tmp_path / "small.json"
    json_path.write_text(json.dumps(raw))
    from_toml = load_schema(SMALL_SCHEMA)
    from_json = load_schema(json_path)
    assert from_toml == from_json
    assert from_toml.to_dict() == from_json.to_dict()
    assert from_toml.fingerprint() == from_json.fingerprint()
    assert from_toml.offsets() == from_json.offsets()


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[[fields]\n')
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value) and "JSON" in str(info.value)


def test_non_utf8_file_is_a_schema_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value)


def test_validation_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(schema_dict(field("ad"), field("colour", kind="ordinal"))))
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value) and "'colour'" in str(info.value)


def test_missing_file_lists_builtin_schemas(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"no such file.*rtb.*criteo"):
        load_schema(tmp_path / "nope.toml")


def test_top_level_array_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(SchemaError, match="top level"):
        load_schema(path)


# ---- order, offsets, fingerprint ----------------------------------------------------------------


def mixed_fields() -> list[dict[str, Any]]:
    return [
        field("ad", buckets=10),
        field("site", scope="context", buckets=20),
        field("bid", kind="numeric", boundaries=[1.0, 2.0], buckets=4),
        field("segs", scope="context", kind="multi_categorical", buckets=30, max_values=3),
        field("geo", scope="context", buckets=40),
    ]


def test_context_fields_come_first_keeping_file_order_within_a_scope() -> None:
    schema = build(*mixed_fields())
    assert schema.names == ("site", "segs", "geo", "ad", "bid")
    assert [f.name for f in schema.context_fields] == ["site", "segs", "geo"]
    assert [f.name for f in schema.candidate_fields] == ["ad", "bid"]


def test_offsets_are_contiguous_in_schema_order() -> None:
    schema = build(*mixed_fields())
    offsets = schema.offsets()
    assert offsets == {"site": 0, "segs": 20, "geo": 50, "ad": 90, "bid": 100}
    assert schema.total_buckets == 104
    rtb = load_schema("rtb")
    rtb_offsets = rtb.offsets()
    start = 0
    for f in rtb.fields:
        assert rtb_offsets[f.name] == start
        start += f.buckets
    assert start == rtb.total_buckets


def test_to_dict_round_trips() -> None:
    for schema in (build(*mixed_fields()), load_schema("rtb"), load_schema("criteo")):
        again = Schema.from_dict(schema.to_dict())
        assert again == schema
        assert again.fingerprint() == schema.fingerprint()


def test_fingerprint_is_stable_across_loads() -> None:
    first = load_schema(SMALL_SCHEMA).fingerprint()
    assert load_schema(SMALL_SCHEMA).fingerprint() == first
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_schema("rtb").fingerprint() != first


def test_fingerprint_ignores_descriptions_name_and_version() -> None:
    base = schema_dict(*mixed_fields())
    other = copy.deepcopy(base)
    other["fields"][0]["description"] = "a new note"
    other["name"], other["version"], other["description"] = "renamed", 7, "top-level note"
    assert Schema.from_dict(other).fingerprint() == Schema.from_dict(base).fingerprint()


@pytest.mark.parametrize(
    ("index", "key", "value"),
    [
        (0, "buckets", 11),
        (2, "boundaries", [1.0, 2.5]),
        (3, "max_values", 4),
        (4, "name", "geo2"),
        (4, "scope", "candidate"),
        (0, "kind", "multi_categorical"),
    ],
)
def test_fingerprint_changes_with_anything_that_changes_hashing(
    index: int, key: str, value: object
) -> None:
    base = schema_dict(*mixed_fields())
    other = copy.deepcopy(base)
    other["fields"][index][key] = value
    assert Schema.from_dict(other).fingerprint() != Schema.from_dict(base).fingerprint()


def test_fingerprint_changes_when_a_builtin_bucket_count_changes() -> None:
    raw = load_schema("rtb").to_dict()
    raw["fields"][0]["buckets"] *= 2
    assert Schema.from_dict(raw).fingerprint() != load_schema("rtb").fingerprint()
