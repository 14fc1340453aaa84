"""ModelRuntime with the real trained fixture model: loading, checks, default model, hot swap."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import tensorflow as tf

from adpredict.errors import InvalidRequestError, ModelError, ModelNotFoundError
from adpredict.model.export import load_signature
from adpredict.schema import Schema
from adpredict.serving import runtime as runtime_module
from adpredict.serving.codec import RequestCodec
from adpredict.serving.runtime import (
    WARMUP_SHAPES,
    LoadedModel,
    ModelRuntime,
    RuntimeEvent,
    configure_tf_threads,
    load_version,
    synthetic_feed,
    valid_model_name,
)

POLL_S = 0.05


@pytest.fixture
def repo(tmp_path: Path, small_model_root: Path) -> Path:
    """A private copy of the fixture repository: ``repo/small/1``."""
    root = tmp_path / "models"
    shutil.copytree(small_model_root, root)
    return root


@pytest_asyncio.fixture
async def runtime(repo: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(repo, poll_interval_s=POLL_S, warmup_batches=2)
    await rt.start()
    yield rt
    await rt.stop()


def publish(src: Path, model_dir: Path, version: int) -> Path:
    """Add a version the atomic way: copy to ``.tmp-*``, then rename to its integer name."""
    tmp = model_dir / f".tmp-{version}"
    shutil.copytree(src, tmp)
    final = model_dir / str(version)
    tmp.rename(final)
    return final


async def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


def feed_for(rt: ModelRuntime, seed: int = 3) -> dict[str, np.ndarray]:
    return synthetic_feed(rt.get().schema, requests=3, candidates=40, seed=seed)


@pytest.mark.asyncio
async def test_predict_equals_exported_signature(runtime: ModelRuntime, repo: Path) -> None:
    model = runtime.get()
    assert (model.name, model.version, model.path) == ("small", 1, repo / "small" / "1")
    assert runtime.ready and runtime.names() == ["small"]
    feed = feed_for(runtime)
    got = model.predict(feed)
    fn, schema, _ = load_signature(repo / "small" / "1")
    want = fn(**{k: tf.constant(v) for k, v in feed.items()})["probability"].numpy()
    assert got.dtype == np.float32 and got.shape == (40,)
    np.testing.assert_array_equal(got, want)
    assert schema.fingerprint() == model.fingerprint
    # Different inputs give different answers: the comparison above is not vacuous.
    assert not np.array_equal(model.predict(feed_for(runtime, seed=4)), got)


@pytest.mark.asyncio
async def test_multi_valued_field_width_and_request_index_dtype(runtime: ModelRuntime) -> None:
    model = runtime.get()
    feed = feed_for(runtime)
    narrow = dict(feed, user_segments=np.full((3, 0), b"", dtype=object))
    wide = dict(narrow, user_segments=np.full((3, 5), b"", dtype=object))
    np.testing.assert_allclose(model.predict(narrow), model.predict(wide), rtol=1e-6)
    as_int64 = dict(feed, request_index=feed["request_index"].astype(np.int64))
    np.testing.assert_array_equal(model.predict(as_int64), model.predict(feed))


@pytest.mark.asyncio
async def test_a_feed_the_model_rejects_is_a_model_error(runtime: ModelRuntime) -> None:
    """The codec validated every request before the merge, so a rejection here is the server's
    fault (INTERNAL for that batch), never the callers' (not InvalidRequestError)."""
    model = runtime.get()
    feed = feed_for(runtime)
    with pytest.raises(ModelError, match="version 1: feed is missing inputs \\['country'\\]"):
        model.predict({k: v for k, v in feed.items() if k != "country"})
    with pytest.raises(ModelError) as bad_number:
        model.predict(dict(feed, bid_cpm=np.array([b"cheap"] * 40, dtype=object)))
    message = str(bad_number.value)
    assert not isinstance(bad_number.value, InvalidRequestError)
    assert message.startswith("model 'small' version 1 failed on a batch of 40 predictions: ")
    assert "cheap" in message and "{{" not in message and "\n" not in message
    with pytest.raises(ModelError, match=r"version 1 failed on a batch of 40 predictions: \S"):
        model.predict(dict(feed, request_index=np.full(40, 7, dtype=np.int32)))
    # The model is unharmed: the next feed is answered.
    assert model.predict(feed).shape == (40,)


@pytest.mark.asyncio
async def test_serving_rows_answers_as_the_strings(runtime: ModelRuntime) -> None:
    """Exports have serving_rows; a version takes the codec's rows feed and answers the same."""
    model = runtime.get()
    assert model.has_rows
    codec = RequestCodec(model.schema)
    feed = feed_for(runtime)
    rows_feed = codec.rows_feed(feed)
    assert "context_rows" in rows_feed and rows_feed["context_rows"].dtype == np.int64
    np.testing.assert_allclose(model.predict(rows_feed), model.predict(feed), rtol=1e-5, atol=1e-7)
    with pytest.raises(ModelError, match=r"version 1 failed on a batch of 40 predictions: \S"):
        model.predict(dict(rows_feed, request_index=np.full(40, 7, dtype=np.int32)))
    half = {k: v for k, v in rows_feed.items() if k != "candidate_rows"}
    with pytest.raises(ModelError, match="feed is missing inputs"):
        model.predict(half)


def test_serving_rows_is_used_only_if_it_agrees(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vdir = repo / "small" / "1"
    real = LoadedModel.predict

    def skewed(self: LoadedModel, feed: dict[str, np.ndarray]) -> np.ndarray:
        out = real(self, feed)
        return out * 0.5 if "context_rows" in feed else out

    monkeypatch.setattr(LoadedModel, "predict", skewed)
    with caplog.at_level(logging.WARNING, logger="adpredict.serving.runtime"):
        model = load_version(vdir, name="small", version=1)
    assert not model.has_rows
    assert "serving_rows disagrees with serving_default" in caplog.text
    assert model.predict(feed_for_schema(model.schema)).shape == (40,)  # strings still serve


@pytest.mark.parametrize("fault", ["skewed on the last warm-up feed", "raises"])
def test_serving_rows_must_agree_on_every_warm_up_feed(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A rows signature that goes wrong only on a later warm-up feed (the largest), or fails,
    is dropped; the version still loads and serves strings."""
    real = LoadedModel.predict
    largest = max(c for _, c in WARMUP_SHAPES)

    def late(self: LoadedModel, feed: dict[str, np.ndarray]) -> np.ndarray:
        out = real(self, feed)
        if "context_rows" in feed and len(feed["request_index"]) == largest:
            if fault == "raises":
                raise ModelError("injected")
            return out * 0.5
        return out

    monkeypatch.setattr(LoadedModel, "predict", late)
    with caplog.at_level(logging.WARNING, logger="adpredict.serving.runtime"):
        model = load_version(repo / "small" / "1", name="small", version=1)
    assert not model.has_rows
    assert ("disagrees" if fault != "raises" else "failed on a warm-up feed") in caplog.text
    assert model.predict(feed_for_schema(model.schema)).shape == (40,)


def test_an_export_without_serving_rows_serves_strings(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exports made before serving_rows existed (simulated: the runtime looks for another name)."""
    monkeypatch.setattr(runtime_module, "ROWS_SIGNATURE", "serving_rows_absent")
    model = load_version(repo / "small" / "1", name="small", version=1)
    assert not model.has_rows
    feed = feed_for_schema(model.schema)
    assert model.predict(feed).shape == (40,)
    with pytest.raises(ModelError, match="feed is missing inputs"):
        model.predict(RequestCodec(model.schema).rows_feed(feed))


def feed_for_schema(schema: Schema) -> dict[str, np.ndarray]:
    return synthetic_feed(schema, requests=3, candidates=40, seed=3)


@pytest.mark.asyncio
async def test_loaded_model_is_immutable(runtime: ModelRuntime) -> None:
    with pytest.raises(AttributeError, match="immutable"):
        runtime.get().version = 5  # type: ignore[misc]


@pytest.mark.asyncio
async def test_unknown_model_name_lists_known_ones(runtime: ModelRuntime) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'nope'.*known models: small"):
        runtime.get("nope")
    with pytest.raises(ModelNotFoundError, match=r"'xxxxx.*\.\.\. \(200 characters\).*small"):
        runtime.get("x" * 200)  # the name is cut, the known models stay in the message
    assert runtime.get("small") is runtime.get("")


@pytest.mark.asyncio
async def test_path_like_model_names_are_invalid_and_never_touch_the_filesystem(
    runtime: ModelRuntime, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo.parent / "outside").mkdir()  # a directory a traversal would reach
    touched: list[str] = []
    for name in ("stat", "lstat", "listdir", "scandir", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda *a, _real=real, **k: touched.append(a) or _real(*a, **k)
        )
    for bad in ("../outside", "..", ".", "small/1", "small/../small", "/etc", ".tmp-1", "a\\b",
                "a\x00b", "s" * 256):  # fmt: skip
        with pytest.raises(InvalidRequestError, match=r"^model: .* is not a model name"):
            runtime.get(bad)
    monkeypatch.undo()
    assert touched == []
    assert not valid_model_name("") and valid_model_name("small") and valid_model_name("s" * 255)


@pytest.mark.asyncio
async def test_default_model_rules(repo: Path) -> None:
    shutil.copytree(repo / "small", repo / "alpha")
    events: list[RuntimeEvent] = []
    rt = ModelRuntime(repo, warmup_batches=1, on_event=events.append)
    await rt.start()
    try:
        assert rt.names() == ["alpha", "small"]
        assert rt.default_name == "alpha"  # alphabetically first of several
        assert rt.get().name == "alpha"
        assert sorted(e.name for e in events if e.kind == "loaded") == ["alpha", "small"]
    finally:
        await rt.stop()
    assert not rt.ready

    rt = ModelRuntime(repo, warmup_batches=1, default_model="small")
    await rt.start()
    try:
        assert rt.get().name == "small"
    finally:
        await rt.stop()

    rt = ModelRuntime(repo, warmup_batches=1, default_model="gamma")
    with pytest.raises(ModelNotFoundError, match=r"'gamma'.*found: alpha, small"):
        await rt.start()


@pytest.mark.asyncio
async def test_missing_or_empty_model_dir_fails_start(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nowhere")):
        await ModelRuntime(tmp_path / "nowhere").start()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no servable model"):
        await ModelRuntime(tmp_path / "empty").start()
    with pytest.raises(ModelNotFoundError, match="pass its parent"):
        await ModelRuntime(repo / "small").start()


@pytest.mark.asyncio
async def test_start_falls_back_to_the_newest_good_version(repo: Path) -> None:
    bad = publish(repo / "small" / "1", repo / "small", 2)
    (bad / "saved_model.pb").write_bytes(b"garbage" * 100)
    rt = ModelRuntime(repo, warmup_batches=1)
    await rt.start()
    try:
        assert rt.get().version == 1
        assert rt.status()["small"].load_failures == 1
        assert "cannot load SavedModel" in rt.status()["small"].last_error
    finally:
        await rt.stop()


@pytest.mark.asyncio
async def test_no_servable_version_lists_reasons(repo: Path) -> None:
    (repo / "small" / "1" / "saved_model.pb").write_bytes(b"\x00garbage")
    with pytest.raises(ModelNotFoundError, match="cannot load SavedModel"):
        await ModelRuntime(repo).start()


@pytest.mark.asyncio
async def test_new_version_is_picked_up_and_old_one_released(
    runtime: ModelRuntime, repo: Path
) -> None:
    old = runtime.get()
    feed = feed_for(runtime)
    before = old.predict(feed)
    (repo / "small" / ".tmp-junk").mkdir()  # an export in progress: never looked at
    for ignored in ("latest", "0", "007"):  # not canonical positive integers
        (repo / "small" / ignored).mkdir()
    publish(repo / "small" / "1", repo / "small", 2)
    await wait_until(lambda: runtime.get().version == 2)
    new = runtime.get()
    assert new.path == repo / "small" / "2" and runtime.versions() == {"small": 2}
    assert runtime.status()["small"].load_failures == 0
    # A holder of the old version (a batch in flight) can still use it...
    np.testing.assert_array_equal(old.predict(feed), before)
    np.testing.assert_array_equal(new.predict(feed), before)  # same weights
    # ...and once it lets go (and the loader thread has returned), the old version is freed.
    refs = [weakref.ref(old), weakref.ref(old._keepalive)]  # the LoadedModel and its SavedModel
    del old
    await wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in refs), 10.0)


@pytest.mark.asyncio
async def test_corrupt_version_is_rejected_once_and_old_keeps_serving(
    runtime: ModelRuntime, repo: Path
) -> None:
    events: list[RuntimeEvent] = []
    runtime._on_event = events.append
    bad = repo / "small" / ".tmp-bad"
    shutil.copytree(repo / "small" / "1", bad)
    (bad / "saved_model.pb").write_bytes(b"garbage" * 100)
    bad.rename(repo / "small" / "2")
    await wait_until(lambda: runtime.status()["small"].load_failures == 1)
    for _ in range(3):  # unchanged files are not retried
        await runtime.poll_now()
    status = runtime.status()["small"]
    assert status.load_failures == 1 and status.version == 1
    assert "cannot load SavedModel" in status.last_error
    assert [(e.kind, e.version) for e in events] == [("failed", 2)]
    assert runtime.get().version == 1
    assert runtime.get().predict(feed_for(runtime)).shape == (40,)


@pytest.mark.asyncio
async def test_half_written_version_is_retried_once_complete(
    runtime: ModelRuntime, repo: Path
) -> None:
    partial = repo / "small" / "2"
    partial.mkdir()  # a non-atomic copy caught halfway: no variables yet
    shutil.copy2(repo / "small" / "1" / "saved_model.pb", partial)
    shutil.copy2(repo / "small" / "1" / "adpredict.json", partial)
    await wait_until(lambda: runtime.status()["small"].load_failures == 1)
    assert runtime.get().version == 1
    shutil.copytree(repo / "small" / "1" / "variables", partial / "variables")
    await wait_until(lambda: runtime.get().version == 2)
    assert runtime.status()["small"].load_failures == 1


@pytest.mark.asyncio
async def test_version_with_another_schema_is_rejected(runtime: ModelRuntime, repo: Path) -> None:
    new = publish(repo / "small" / "1", repo / "small", 2)
    meta = json.loads((new / "adpredict.json").read_text())
    meta["schema"]["fields"][0]["buckets"] = 8192  # same inputs, different hashing
    meta["schema_fingerprint"] = Schema.from_dict(meta["schema"]).fingerprint()
    (new / "adpredict.json").write_text(json.dumps(meta))
    await wait_until(lambda: runtime.status()["small"].load_failures == 1)
    assert "needs a new model name" in runtime.status()["small"].last_error
    assert runtime.get().version == 1


def test_edited_metadata_fingerprint_mismatch_is_caught(repo: Path) -> None:
    vdir = repo / "small" / "1"
    meta = json.loads((vdir / "adpredict.json").read_text())
    meta["schema"]["fields"][0]["buckets"] = 8192
    (vdir / "adpredict.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="edited or is corrupt"):
        load_version(vdir, name="small", version=1)


@pytest.mark.asyncio
async def test_emptied_or_unreadable_dir_keeps_serving(
    runtime: ModelRuntime, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[RuntimeEvent] = []
    runtime._on_event = events.append
    aside = repo.parent / "aside"
    (repo / "small").rename(aside)  # the dir is empty now
    await wait_until(lambda: any(e.kind == "dir_problem" for e in events))
    assert "is empty" in events[-1].reason
    assert runtime.get().predict(feed_for(runtime)).shape == (40,)
    repo.rmdir()
    repo.write_text("not a directory")  # unreadable as a directory
    await wait_until(lambda: "cannot read" in events[-1].reason)
    assert runtime.get().version == 1 and runtime.ready
    repo.unlink()
    repo.mkdir()
    aside.rename(repo / "small")
    await wait_until(lambda: events[-1].kind == "dir_ok")
    assert [e.kind for e in events] == ["dir_problem", "dir_problem", "dir_ok"]
    assert runtime.status()["small"].load_failures == 0
    # One warning for the episode: "empty" turning into "cannot read" is not a second one.
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "keeping" in r.message]
    assert len(warnings) == 1, [r.message for r in warnings]


@pytest.mark.asyncio
async def test_new_model_name_appears_while_serving(runtime: ModelRuntime, repo: Path) -> None:
    tmp = repo / ".tmp-beta"
    shutil.copytree(repo / "small", tmp)
    tmp.rename(repo / "beta")
    await wait_until(lambda: "beta" in runtime.names())
    assert runtime.get("beta").version == 1
    assert runtime.default_name == "small"  # the default never moves at run time


def test_thread_pools_cannot_change_after_tensorflow_started(runtime_started_tf: None) -> None:
    with pytest.raises(ModelError, match="before loading models"):
        configure_tf_threads(intra_op=tf.config.threading.get_intra_op_parallelism_threads() + 3)
    configure_tf_threads(None, None)  # no request, no error


@pytest.fixture
def runtime_started_tf() -> None:
    tf.constant(1.0) + 1.0  # make sure TensorFlow's context exists in this process
