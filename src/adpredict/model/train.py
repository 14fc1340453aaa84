"""Training: read shards, fit LR/FM/DeepFM, evaluate on a held-out split, export.

``train()`` is what ``adpredict train`` runs. Every ``holdout_every``-th record of each
shard is held out; it never trains. The evaluation reports log-loss, AUC and
calibration (mean predicted / observed CTR), and - when the data carries each row's
true click probability - the same metrics for that oracle, the best any model can do.
Nothing is exported unless training and evaluation finish.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from adpredict.data import records
from adpredict.errors import DataError, ModelError
from adpredict.model import evaluation
from adpredict.model.ctr import MODEL_KINDS, CTRModel
from adpredict.model.export import ExportResult, copy_weights_from_export, export_model

OPTIMIZERS = ("lazyadam", "adam", "adagrad", "ftrl")
#: Default learning rates (override with --learning-rate). LazyAdam's and Adam's were tuned on
#: the built-in synthetic data; Adagrad's and FTRL's are untuned starting points (both trailed
#: Adam there: see docs/BENCHMARKS.md).
DEFAULT_LEARNING_RATES = {"lazyadam": 0.002, "adam": 0.002, "adagrad": 0.05, "ftrl": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run; recorded in the export's metadata."""

    model: str = "deepfm"
    optimizer: str = "lazyadam"
    epochs: int = 1
    batch_size: int = 1024
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES[optimizer]
    lr_decay: bool = True  # cosine decay to 0 over the run: a calm final model
    dim: int = 8
    l2: float = 1e-4  # L2 on the table rows a batch touches, per example
    min_count: int = 1  # feature admission: rows seen fewer times share the missing bucket
    hidden: tuple[int, ...] = (64, 32)
    holdout_every: int = 10  # every 10th block of 64 rows of each shard is held out
    shuffle_buffer: int = 100_000  # records
    seed: int = 0
    init_from: str | None = None
    checkpoint: bool = True  # also write a checkpoint with optimizer slots

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ModelError(f"--model must be one of {list(MODEL_KINDS)}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ModelError(
                f"--optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.epochs < 1:
            raise ModelError(f"--epochs must be >= 1, got {self.epochs}")
        if not 1 <= self.batch_size <= 1 << 20:
            raise ModelError(f"--batch-size must be in [1, {1 << 20}], got {self.batch_size}")
        if self.learning_rate is not None and not (
            math.isfinite(self.learning_rate) and self.learning_rate > 0
        ):
            raise ModelError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ModelError(f"--l2 must be a non-negative number, got {self.l2}")
        if self.min_count < 1:
            raise ModelError(f"--min-count must be >= 1, got {self.min_count}")
        if self.holdout_every < 2:
            raise ModelError(f"--holdout-every must be >= 2, got {self.holdout_every}")

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATES[self.optimizer]


@dataclass
class TrainResult:
    """What a run produced."""

    metrics: dict[str, Any]
    export: ExportResult | None
    history: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(
    name: str, learning_rate: float, decay_steps: int = 0
) -> keras.optimizers.Optimizer:
    """Build one of ``OPTIMIZERS``; with ``decay_steps``, the rate decays to 0 (cosine)."""
    if decay_steps > 0:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    if name == "lazyadam":
        from adpredict.model.lazyadam import LazyAdam

        return LazyAdam(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=learning_rate)
    if name == "ftrl":
        return keras.optimizers.Ftrl(learning_rate=learning_rate)
    raise ModelError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZERS)}")


class Trainer:
    """Owns the model, optimizer and compiled train/predict steps for one run."""

    def __init__(
        self, model: CTRModel, optimizer: keras.optimizers.Optimizer, l2: float = 0.0
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.optimizer.build(model.trainable_variables)

        @tf.function(reduce_retracing=True)
        def train_step(batch: dict[str, tf.Tensor]) -> tf.Tensor:
            with tf.GradientTape() as tape:
                logits, rows = model.logits_and_rows(batch)
                loss = tf.reduce_mean(
                    tf.nn.sigmoid_cross_entropy_with_logits(
                        labels=batch[records.LABEL], logits=logits
                    )
                )
                # L2 on the rows this batch touched: keeps the table's gradient sparse.
                penalty = l2 * tf.reduce_mean(tf.reduce_sum(tf.square(rows), axis=[1, 2]))
                objective = loss + penalty
            variables = model.trainable_variables
            grads = tape.gradient(objective, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return loss

        @tf.function(reduce_retracing=True)
        def predict_step(batch: dict[str, tf.Tensor]) -> tf.Tensor:
            return tf.sigmoid(model(batch))

        self.train_step = train_step
        self.predict_step = predict_step

    def fit_epoch(
        self, dataset: Any, on_step: Callable[[int, float | None], None] | None = None
    ) -> float:
        """One pass over ``dataset``; returns the mean training loss."""
        losses = []
        for step, batch in enumerate(dataset, 1):
            loss = self.train_step(batch)
            if step % 50 == 0:  # fetching the value syncs; do it rarely
                losses.append(float(loss))
                if on_step:
                    on_step(step, losses[-1])
            elif on_step:
                on_step(step, None)
        return float(np.mean(losses)) if losses else float("nan")

    def predict(self, dataset: Any, *, with_true_ctr: bool) -> tuple[np.ndarray, ...]:
        """Predictions, labels (and true CTRs) for a whole dataset."""
        probs, labels, truth = [], [], []
        for batch in dataset:
            probs.append(self.predict_step(batch).numpy())
            labels.append(batch[records.LABEL].numpy())
            if with_true_ctr:
                truth.append(batch[records.TRUE_CTR].numpy())
        out = [np.concatenate(probs), np.concatenate(labels)]
        if with_true_ctr:
            out.append(np.concatenate(truth))
        return tuple(out)


def _data_errors(info: records.DatasetInfo) -> Callable[[BaseException], DataError]:
    """Turn a pipeline error into a DataError naming the shard (and row, for labels)."""
    files = info.files

    def convert(exc: BaseException) -> DataError:
        if isinstance(exc, tf.errors.DataLossError):
            bad = records.find_corrupt_shard(files)
            where = bad or "one of the shards"
            return DataError(f"{where}: corrupt TFRecord data ({exc.message.splitlines()[0]})")
        msg = getattr(exc, "message", str(exc))
        if "label must be 0 or 1" in msg:
            found = records.find_bad_label(files, info.format_version)
            if found:
                path, row, value = found
                return DataError(f"{path}: row {row} has a label other than 0 or 1 ({value})")
            return DataError(f"a shard has a label other than 0 or 1 ({msg.splitlines()[0]})")
        if isinstance(exc, tf.errors.InvalidArgumentError):
            found = records.find_unparseable_shard(files, info.schema, info.format_version)
            if found:
                return DataError(f"{found[0]}: malformed records ({found[1]})")
        return DataError(f"cannot read the data: {msg.splitlines()[0]}")

    return convert


def train(
    data_dir: str | Path,
    model_dir: str | Path,
    config: TrainConfig,
    *,
    progress: bool = True,
    export: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train on ``data_dir`` and export a new version under ``model_dir``."""
    say = log or (lambda s: print(s, file=sys.stderr))
    info = records.read_manifest(data_dir)
    schema = info.schema
    files = info.files
    if info.rows < config.holdout_every * 2:
        raise DataError(
            f"{info.path}: {info.rows} rows are too few to hold out every {config.holdout_every}th"
        )
    keras.utils.set_random_seed(config.seed)
    model = CTRModel(
        schema, kind=config.model, dim=config.dim, hidden=config.hidden, seed=config.seed
    )
    warm: dict[str, Any] | None = None
    if config.init_from:
        warm = copy_weights_from_export(model, config.init_from)
        say(f"warm start from {config.init_from} (version {warm.get('version')})")
    train_rows = info.rows - sum(
        records.holdout_rows(rows, config.holdout_every) for _, rows in info.shards
    )
    steps_per_epoch = records.training_batches(
        [rows for _, rows in info.shards],
        config.batch_size,
        config.holdout_every,
        info.format_version,
    )
    decay_steps = steps_per_epoch * config.epochs if config.lr_decay else 0
    optimizer = make_optimizer(config.optimizer, config.lr, decay_steps)
    trainer = Trainer(model, optimizer, config.l2)

    def dataset(holdout: bool, shuffle: bool) -> Any:
        return records.make_dataset(
            files,
            schema,
            config.batch_size,
            holdout_every=config.holdout_every,
            holdout=holdout,
            shuffle_buffer=config.shuffle_buffer if shuffle else 0,
            seed=config.seed,
            with_true_ctr=info.has_true_ctr,
            format_version=info.format_version,
        )

    to_data_error = _data_errors(info)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    try:
        admission = admit_frequent_rows(
            model, dataset(holdout=False, shuffle=False), config.min_count, keep_existing=bool(warm)
        )
        if config.min_count > 1:
            say(
                f"feature admission: {admission['admitted_rows']:,} table rows seen >= "
                f"{config.min_count} times are admitted"
            )
        if not warm:
            base_rate = _base_rate(dataset(holdout=False, shuffle=False))
            model.bias.assign(math.log(base_rate / (1 - base_rate)))
            say(f"base rate {base_rate:.4f}: bias initialised to its logit")
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            bar = _progress(steps_per_epoch, f"epoch {epoch}/{config.epochs}", enabled=progress)
            loss = trainer.fit_epoch(dataset(holdout=False, shuffle=True), bar.update)
            bar.close()
            seconds = time.perf_counter() - t0
            history.append(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "seconds": seconds,
                    "examples_per_s": train_rows / seconds,
                }
            )
            say(f"epoch {epoch}: loss {loss:.5f}, {train_rows / seconds:,.0f} examples/s")
        train_seconds = time.perf_counter() - started
        outputs = trainer.predict(
            dataset(holdout=True, shuffle=False), with_true_ctr=info.has_true_ctr
        )
    except tf.errors.OpError as exc:
        raise to_data_error(exc) from None

    metrics: dict[str, Any] = {"holdout": evaluation.summarize(outputs[1], outputs[0])}
    if info.has_true_ctr:
        metrics["oracle"] = evaluation.summarize(outputs[1], outputs[2])
        metrics["logloss_vs_oracle"] = metrics["holdout"]["logloss"] / metrics["oracle"]["logloss"]
        metrics["auc_vs_oracle"] = metrics["holdout"]["auc"] - metrics["oracle"]["auc"]
    metrics["admission"] = admission
    metrics["train"] = {
        "rows": train_rows,
        "epochs": config.epochs,
        "seconds": train_seconds,
        "examples_per_s": train_rows * config.epochs / train_seconds,
        "final_loss": history[-1]["loss"],
    }
    result = TrainResult(metrics=metrics, export=None, history=history)
    if not export:
        return result
    meta = {
        "training": {
            **asdict(config),
            "learning_rate": config.lr,
            "history": history,
            "warm_start": warm.get("version") if warm else None,
        },
        "data": {
            "path": str(info.path),
            "rows": info.rows,
            "source": info.source,
            "created": info.created,
        },
        "metrics": metrics,
    }
    result.export = export_model(
        model, model_dir, meta, optimizer=optimizer if config.checkpoint else None
    )
    return result


def count_rows(model: CTRModel, dataset: Any) -> np.ndarray:
    """How often each table row is looked up by ``dataset`` (before admission)."""
    total = model.schema.total_buckets

    @tf.function(reduce_retracing=True)
    def count(batch: dict[str, tf.Tensor]) -> tf.Tensor:
        hashed = model.hasher(batch)
        ids = [tf.reshape(hashed.single_ids, [-1])]
        for multi, weights in zip(hashed.multi_ids, hashed.multi_weights, strict=True):
            ids.append(tf.boolean_mask(tf.reshape(multi, [-1]), tf.reshape(weights, [-1]) > 0))
        flat = tf.cast(tf.concat(ids, axis=0), tf.int32)
        return tf.math.bincount(flat, minlength=total, maxlength=total, dtype=tf.int64)

    counts = np.zeros(total, np.int64)
    for batch in dataset:
        counts += count(batch).numpy()
    return counts


def admit_frequent_rows(
    model: CTRModel, dataset: Any, min_count: int, *, keep_existing: bool = False
) -> dict[str, Any]:
    """Admit the table rows that ``dataset`` looks up at least ``min_count`` times.

    A value seen only a handful of times gets a row of noise; in a controlled test, 8
    signal-free high-cardinality fields cost an FM 1.5% of log-loss. Rows below the threshold
    share their field's missing bucket instead, in training and - because the mask is a model
    variable - in serving. Missing buckets are always admitted; with ``keep_existing`` (warm
    start) previously admitted rows stay. On the built-in synthetic data, min_count 10-100
    made no measurable difference to DeepFM, hence the default of 1, which admits every row
    and skips the counting pass over the data.
    """
    if min_count <= 1:
        return {"min_count": min_count, "admitted_rows": int(model.admitted.numpy().sum())}
    counts = count_rows(model, dataset)
    admitted = counts >= min_count
    for offset in model.schema.offsets().values():
        admitted[offset] = True
    if keep_existing:
        admitted |= model.admitted.numpy() > 0
    model.admitted.assign(admitted.astype(np.int8))
    seen = counts > 0
    return {
        "min_count": min_count,
        "admitted_rows": int(admitted.sum()),
        "seen_rows": int(seen.sum()),
        "lookups_admitted": float(counts[admitted].sum() / max(counts.sum(), 1)),
    }


def _base_rate(dataset: Any, rows: int = 100_000) -> float:
    """Mean label of the first ``rows`` training rows, clipped to [1e-4, 1 - 1e-4].

    Starting the bias at the base rate's logit spares the optimizer thousands of steps
    of walking it from p = 0.5 down to a ~2% CTR.
    """
    clicks = seen = 0.0
    for batch in dataset:
        labels = batch[records.LABEL].numpy()
        clicks += float(labels.sum())
        seen += labels.size
        if seen >= rows:
            break
    rate = clicks / seen if seen else 0.5
    return min(max(rate, 1e-4), 1 - 1e-4)


class _NoBar:
    def update(self, step: int, loss: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar advanced per step, showing the latest fetched loss."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="step",
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
            dynamic_ncols=True,
        )

    def update(self, step: int, loss: float | None) -> None:
        self._bar.update(1)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def _progress(total: int, desc: str, *, enabled: bool) -> _Bar | _NoBar:
    return _Bar(total, desc) if enabled else _NoBar()
