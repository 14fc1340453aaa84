"""Shared fixtures: a small synthetic data set and a small trained, exported model."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_SCHEMA = FIXTURES / "rtb_small.toml"


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k synthetic rows of the rtb fields with small bucket counts (seed 7)."""
    from adpredict.data import records, synth
    from adpredict.schema import load_schema

    schema = load_schema(SMALL_SCHEMA)
    out = tmp_path_factory.mktemp("data") / "small"
    with records.DatasetWriter(out, schema, rows_per_shard=2_000, has_true_ctr=True) as writer:
        for block in synth.generate(20_000, seed=7):
            writer.write_columns(block.columns, block.labels, block.true_ctr)
    return out


@pytest.fixture(scope="session")
def small_model_root(tmp_path_factory: pytest.TempPathFactory, small_data_dir: Path) -> Path:
    """A model repository ``ROOT/small/1/`` holding a DeepFM trained on ``small_data_dir``.

    Treat it as read-only; copy it (``shutil.copytree``) to add versions.
    """
    from adpredict.model.train import TrainConfig, train

    root = tmp_path_factory.mktemp("models")
    train(
        small_data_dir,
        root / "small",
        TrainConfig(epochs=1, batch_size=512, checkpoint=False, hidden=(16,)),
        progress=False,
        log=lambda _: None,
    )
    return root


def _prometheus_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (make test installs Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI runs `make test`, which installs it: missing is a defect
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``; skips outside CI if it is missing, fails in CI."""
    return _prometheus_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Path of the ``prometheus`` server; skips outside CI if it is missing, fails in CI."""
    return _prometheus_tool("prometheus")
