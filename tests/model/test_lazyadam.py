"""LazyAdam against an independent NumPy implementation of the tfa.optimizers.LazyAdam rule."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from adpredict.model.lazyadam import LazyAdam

RTOL = 1e-6
ATOL = 1e-7  # floor for entries that cancel to ~0 (e.g. a moment whose gradients changed sign)
STEPS = 5
ROWS, DIM = 10, 3
UNTOUCHED = [7, 8, 9]  # no step below ever names these rows

# Per step: row ids (with repeats) of a sparse gradient. Row 0 appears only in step 1, so its
# moments must stay frozen from step 2 on; row 6 appears only in the last step.
STEP_IDS = [
    [0, 1, 1, 2, 2, 2],
    [1, 3, 3],
    [4, 5, 1, 4],
    [2, 2],
    [5, 6, 3, 1, 6],
]


class NumpyLazyAdam:
    """The rule, written out in NumPy float32 (same rounding of hyper-parameters as the TF op)."""

    def __init__(
        self, var: np.ndarray, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7
    ) -> None:
        self.var = var.astype(np.float32).copy()
        self.m = np.zeros_like(self.var)
        self.v = np.zeros_like(self.var)
        self.b1, self.b2, self.eps = np.float32(beta_1), np.float32(beta_2), np.float32(epsilon)
        self.t = 0

    def step(self, ids: np.ndarray, values: np.ndarray, lr: float) -> None:
        self.t += 1
        rows, where = np.unique(ids, return_inverse=True)
        g = np.zeros((len(rows), self.var.shape[1]), np.float32)
        np.add.at(g, where, values.astype(np.float32))
        one, t = np.float32(1), np.float32(self.t)
        self.m[rows] = self.b1 * self.m[rows] + (one - self.b1) * g
        self.v[rows] = self.b2 * self.v[rows] + (one - self.b2) * g * g
        alpha = np.float32(lr) * np.sqrt(one - self.b2**t) / (one - self.b1**t)
        self.var[rows] -= alpha * self.m[rows] / (np.sqrt(self.v[rows]) + self.eps)


def slots(optimizer: LazyAdam, variable: keras.Variable) -> tuple[keras.Variable, keras.Variable]:
    """The (momentum, velocity) slots Keras' Adam keeps for ``variable``."""
    index = optimizer._get_variable_index(variable)
    m, v = optimizer._momentums[index], optimizer._velocities[index]
    # Guard against the private attributes meaning something else in a future Keras.
    assert m.path.endswith("momentum") and v.path.endswith("velocity")
    assert any(x is m for x in optimizer.variables) and any(x is v for x in optimizer.variables)
    return m, v


def assert_state(
    optimizer: LazyAdam, table: keras.Variable, ref: NumpyLazyAdam, msg: str = ""
) -> None:
    m, v = slots(optimizer, table)
    np.testing.assert_allclose(table.numpy(), ref.var, rtol=RTOL, atol=ATOL, err_msg=msg + " var")
    np.testing.assert_allclose(m.numpy(), ref.m, rtol=RTOL, atol=ATOL, err_msg=msg + " m")
    np.testing.assert_allclose(v.numpy(), ref.v, rtol=RTOL, atol=ATOL, err_msg=msg + " v")


def make_table(seed: int = 0) -> tuple[keras.Variable, np.ndarray]:
    init = np.random.default_rng(seed).normal(size=(ROWS, DIM)).astype(np.float32)
    return keras.Variable(init, name="table"), init


@pytest.mark.parametrize("use_tf_function", [False, True], ids=["eager", "tf_function"])
def test_sparse_gradients_match_numpy_and_leave_other_rows_untouched(
    use_tf_function: bool,
) -> None:
    table, init = make_table()
    optimizer = LazyAdam(learning_rate=0.1)
    optimizer.build([table])
    ref = NumpyLazyAdam(init)

    def apply(ids: tf.Tensor, values: tf.Tensor) -> None:
        grad = tf.IndexedSlices(values, ids, dense_shape=tf.constant([ROWS, DIM]))
        optimizer.apply_gradients([(grad, table)])

    if use_tf_function:
        apply = tf.function(
            apply,
            input_signature=[
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, DIM], tf.float32),
            ],
        )

    rng = np.random.default_rng(1)
    m, v = slots(optimizer, table)
    for step, ids in enumerate(STEP_IDS, start=1):
        values = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        row0_before = (table.numpy()[0], m.numpy()[0], v.numpy()[0])

        apply(tf.constant(ids, tf.int32), tf.constant(values))
        ref.step(np.array(ids), values, lr=0.1)

        assert_state(optimizer, table, ref, msg=f"step {step}")
        if step >= 2:  # row 0 is absent: weight and both moments are bit-for-bit unchanged
            np.testing.assert_array_equal(table.numpy()[0], row0_before[0])
            np.testing.assert_array_equal(m.numpy()[0], row0_before[1])
            np.testing.assert_array_equal(v.numpy()[0], row0_before[2])

    assert int(optimizer.iterations.numpy()) == STEPS
    np.testing.assert_array_equal(table.numpy()[UNTOUCHED], init[UNTOUCHED])
    np.testing.assert_array_equal(m.numpy()[UNTOUCHED], 0.0)
    np.testing.assert_array_equal(v.numpy()[UNTOUCHED], 0.0)
    # The moments of the other rows did move, so the checks above are not vacuous.
    assert np.all(m.numpy()[:7] != 0.0) and np.all(v.numpy()[:7] != 0.0)


def test_gradient_through_gather_in_tf_function_is_sparse_and_matches_numpy() -> None:
    table, init = make_table(seed=2)
    optimizer = LazyAdam(learning_rate=0.05)
    optimizer.build([table])
    ref = NumpyLazyAdam(init)
    grad_types: list[type] = []

    @tf.function(jit_compile=False)
    def train_step(ids: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, ids) * weights)
        (grad,) = tape.gradient(loss, [table])
        grad_types.append(type(grad))  # runs at trace time
        optimizer.apply_gradients(zip([grad], [table], strict=True))
        return loss

    rng = np.random.default_rng(3)
    for step, ids in enumerate(STEP_IDS, start=1):
        weights = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        train_step(tf.constant(ids, tf.int32), tf.constant(weights))
        # d loss / d table[ids[i]] = weights[i], accumulated over repeats.
        ref.step(np.array(ids), weights, lr=0.05)
        assert_state(optimizer, table, ref, msg=f"step {step}")

    assert grad_types and all(t is tf.IndexedSlices for t in grad_types)
    np.testing.assert_array_equal(table.numpy()[UNTOUCHED], init[UNTOUCHED])


def test_dense_variable_in_same_call_matches_keras_adam() -> None:
    table, _ = make_table(seed=4)
    bias = keras.Variable(np.linspace(-1, 1, 4, dtype=np.float32), name="bias")
    bias_for_adam = keras.Variable(bias.numpy(), name="bias_adam")
    lazy = LazyAdam(learning_rate=0.1)
    adam = keras.optimizers.Adam(learning_rate=0.1)

    rng = np.random.default_rng(5)
    for ids in STEP_IDS:
        sparse = tf.IndexedSlices(
            tf.constant(rng.normal(size=(len(ids), DIM)), tf.float32), tf.constant(ids)
        )
        dense = tf.constant(rng.normal(size=4), tf.float32)
        lazy.apply_gradients([(sparse, table), (dense, bias)])
        adam.apply_gradients([(dense, bias_for_adam)])
        np.testing.assert_allclose(bias.numpy(), bias_for_adam.numpy(), rtol=RTOL, atol=0)

    assert not np.allclose(bias.numpy(), np.linspace(-1, 1, 4))
    lazy_m, lazy_v = slots(lazy, bias)
    adam_index = adam._get_variable_index(bias_for_adam)
    np.testing.assert_allclose(lazy_m.numpy(), adam._momentums[adam_index].numpy(), rtol=RTOL)
    np.testing.assert_allclose(lazy_v.numpy(), adam._velocities[adam_index].numpy(), rtol=RTOL)


def test_learning_rate_schedule_is_followed() -> None:
    table, init = make_table(seed=6)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    optimizer = LazyAdam(learning_rate=schedule)
    ref = NumpyLazyAdam(init)

    rng = np.random.default_rng(7)
    for step, ids in enumerate(STEP_IDS, start=1):
        values = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        grad = tf.IndexedSlices(tf.constant(values), tf.constant(ids))
        optimizer.apply_gradients([(grad, table)])
        ref.step(np.array(ids), values, lr=0.2 * 0.5 ** (step - 1))  # schedule(iterations)
        assert_state(optimizer, table, ref, msg=f"step {step}")


def test_get_config_round_trip() -> None:
    optimizer = LazyAdam(
        learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-6, clipnorm=1.0, name="lazy"
    )
    config = optimizer.get_config()
    restored = LazyAdam.from_config(config)
    assert restored.get_config() == config
    assert (config["beta_1"], config["beta_2"], config["epsilon"]) == (0.8, 0.99, 1e-6)
    assert config["learning_rate"] == pytest.approx(0.05)

    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == "adpredict>LazyAdam"
    revived = keras.optimizers.deserialize(serialized)
    assert type(revived) is LazyAdam
    assert revived.get_config() == config


def test_get_config_round_trip_with_schedule() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=10, decay_rate=0.9)
    config = LazyAdam(learning_rate=schedule).get_config()
    restored = LazyAdam.from_config(config)
    assert isinstance(restored._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert restored._learning_rate.get_config() == schedule.get_config()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amsgrad": True}, "amsgrad"),
        ({"weight_decay": 0.01}, "weight_decay"),
        ({"global_clipnorm": 1.0}, "global_clipnorm"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
        ({"loss_scale_factor": 128.0}, "loss_scale_factor"),
    ],
)
def test_unsupported_options_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LazyAdam(**kwargs)


def test_clipnorm_keeps_updates_lazy() -> None:
    table, init = make_table(seed=8)
    optimizer = LazyAdam(learning_rate=0.1, clipnorm=0.5)
    grad = tf.IndexedSlices(tf.fill([2, DIM], 10.0), tf.constant([1, 1]))
    optimizer.apply_gradients([(grad, table)])
    moved_rows = np.flatnonzero(np.any(table.numpy() != init, axis=1))
    assert moved_rows.tolist() == [1]
