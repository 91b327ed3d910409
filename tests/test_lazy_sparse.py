"""lazy_sparse=True: sparse (tf.IndexedSlices) gradients touch their rows only.

TensorFlow only: Keras's JAX and PyTorch backends give embeddings dense
gradients, so there is nothing sparse to be lazy about.
"""

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tests.helpers import to_numpy
from tests.test_update_rule import ATOL, RTOL

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only Keras's TensorFlow backend produces sparse "
    "(tf.IndexedSlices) gradients; JAX and PyTorch give dense ones",
)

ROWS, DIM, STEPS = 12, 3, 30


def _lazy_reference(table, steps, lr, b1=0.9, b2=0.999, eps=1e-8,
                    amsgrad=False, wd=0.0, wd_mode="decoupled"):
    """Float64 LazyAdam: rows outside a step's indices are left alone."""
    p = table.astype(np.float64)
    m, v, vmax = (np.zeros_like(p) for _ in range(3))
    for t, (indices, values) in enumerate(steps, start=1):
        g = np.zeros_like(p)
        np.add.at(g, indices, values)  # duplicates summed
        rows = np.unique(indices)
        gr = g[rows]
        if wd and wd_mode == "l2":
            gr = gr + wd * p[rows]
        elif wd and wd_mode == "decoupled":
            p[rows] -= lr * wd * p[rows]
        elif wd:
            p[rows] -= wd * p[rows]
        m[rows] = b1 * m[rows] + (1 - b1) * gr
        v[rows] = b2 * v[rows] + (1 - b2) * gr * gr
        vmax[rows] = np.maximum(vmax[rows], v[rows])
        vr = vmax[rows] if amsgrad else v[rows]
        m_hat, v_hat = m[rows] / (1 - b1**t), vr / (1 - b2**t)
        p[rows] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def _steps(seed=61):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, ROWS // 2, size=4),  # rows 6.. never touched
             rng.normal(size=(4, DIM)).astype("float32"))
            for _ in range(STEPS)]


@pytest.mark.parametrize("config", [
    dict(), dict(amsgrad=True),
    dict(weight_decay=0.05), dict(weight_decay=0.05,
                                  weight_decay_mode="decoupled_unscaled"),
    dict(weight_decay=0.05, weight_decay_mode="l2"),
], ids=str)
def test_lazy_steps_follow_lazy_reference(config):
    import tensorflow as tf

    table = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(
        "float32")
    variable = keras.Variable(table)
    opt = AdamPlus(learning_rate=0.01, lazy_sparse=True, **config)
    steps = _steps()
    for indices, values in steps:
        opt.apply([tf.IndexedSlices(tf.constant(values),
                                    tf.constant(indices, tf.int64),
                                    tf.constant([ROWS, DIM], tf.int64))],
                  [variable])
    got = keras.ops.convert_to_numpy(variable)
    wd = config.get("weight_decay", 0.0)
    want = _lazy_reference(table, steps, 0.01, amsgrad=config.get(
        "amsgrad", False), wd=wd, wd_mode=config.get("weight_decay_mode",
                                                     "decoupled"))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got[ROWS // 2:], table[ROWS // 2:])
    assert np.abs(got[:ROWS // 2] - table[:ROWS // 2]).max() > 0.05


def test_embedding_model_fit_leaves_unseen_rows_exactly_and_dense_does_not():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, size=(64, 4))  # ids 50..99 never seen
    y = rng.normal(size=(64, 1)).astype("float32")
    tables = {}
    for lazy in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(100, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ])
        initial = model.layers[0].get_weights()[0].copy()
        model.compile(optimizer=AdamPlus(learning_rate=0.01,
                                         lazy_sparse=lazy,
                                         weight_decay=0.1), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        tables[lazy] = model.layers[0].get_weights()[0]
    np.testing.assert_array_equal(tables[True][50:], initial[50:])
    # Dense weight decay shrinks every row; lazy leaves unseen rows.
    assert np.abs(tables[False][50:] - initial[50:]).max() > 1e-4
    assert np.abs(tables[True][:50] - initial[:50]).max() > 1e-3


def test_lazy_sparse_refuses_modes_it_lacks():
    with pytest.raises(ValueError, match="Received: lazy_sparse=True, "
                       "adamax=True"):
        AdamPlus(lazy_sparse=True, adamax=True)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sparse_nan_step_is_skipped_compiled(jit_compile):
    # skip_nonfinite with lazy_sparse in a compiled step: under XLA the
    # scattered rows are selected against their old values (nothing else
    # copied); under tf.function the step sits in a cond. A NaN row leaves
    # the table, m, v and the step count exactly as they were.
    import tensorflow as tf

    rng = np.random.default_rng(5)
    table = keras.Variable(rng.normal(size=(ROWS, DIM)).astype("float32"))
    optimizer = AdamPlus(learning_rate=0.1, lazy_sparse=True, amsgrad=True,
                         skip_nonfinite=True)
    optimizer.build([table])

    def slices(values, indices):
        return tf.IndexedSlices(tf.constant(values, tf.float32),
                                tf.constant(indices, tf.int64),
                                tf.constant([ROWS, DIM], tf.int64))

    step = tf.function(lambda g: optimizer.apply([g], [table]),
                       jit_compile=jit_compile)
    initial = table.numpy().copy()
    good = rng.normal(size=(2, DIM)).astype("float32")
    step(slices(good, [1, 4]))
    before = [np.array(x) for x in to_numpy([table] + optimizer.variables)]
    bad = good.copy()
    bad[1, 2] = np.nan
    step(slices(bad, [2, 5]))
    after = to_numpy([table] + optimizer.variables)
    names = ["table"] + [v.name for v in optimizer.variables]
    for name, a, b in zip(names, before, after):
        if name == "skipped_steps":
            assert (int(a), int(b)) == (0, 1)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    # The good step moved rows 1 and 4 only (lazy), by about lr.
    moved = np.abs(before[0] - initial).max(axis=1)
    assert (moved[[1, 4]] > 0.05).all() and (
        np.delete(moved, [1, 4]) == 0).all(), moved
