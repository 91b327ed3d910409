"""skip_nonfinite=True: a step with any NaN/Inf gradient changes nothing.

Each test compares a run with corrupted steps against the same run with
those steps removed, on the current backend, eagerly and compiled.
"""

import os

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus, BetaDecay
from tests.helpers import (
    make_problem,
    make_variables,
    run_optimizer,
    to_numpy,
)
from tests.reference import run_reference
from tests.test_update_rule import ATOL, RTOL

BAD = {3: np.nan, 7: np.inf, 8: -np.inf, 15: np.nan}


def _corrupt(grads):
    """Poisons one entry of one gradient in each step of BAD."""
    corrupted = [[g.copy() for g in step] for step in grads]
    for t, value in BAD.items():
        corrupted[t][t % 2].flat[t % 3] = value
    return corrupted


@pytest.mark.parametrize("config", [
    dict(),
    dict(amsgrad=True, weight_decay=0.05),
    dict(adamax=True, nesterov=True),
    dict(use_ema=True),
], ids=str)
@pytest.mark.quick
def test_corrupted_steps_are_skipped_exactly(config):
    params, grads = make_problem(seed=31, steps=20)
    clean = [step for t, step in enumerate(grads) if t not in BAD]
    opt = AdamPlus(learning_rate=0.01, skip_nonfinite=True, **config)
    got, _ = run_optimizer(opt, params, _corrupt(grads))
    plain = AdamPlus(learning_rate=0.01, **config)
    want, _ = run_optimizer(plain, params, clean)
    for g, w in zip(got, want):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g, w)
    for a, b in zip(to_numpy(opt.variables[:len(plain.variables)]),
                    to_numpy(plain.variables)):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(opt.skipped_steps)) == len(BAD)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == len(clean)
    if not config:
        ref = run_reference(dict(learning_rate=0.01), params, clean)
        for g, w in zip(got, ref):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.quick
def test_without_the_flag_nan_spreads():
    # What the flag prevents: one NaN step poisons Adam's state for good.
    params, grads = make_problem(seed=31, steps=20)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01), params,
                           _corrupt(grads))
    assert not np.isfinite(got[0]).all()


def test_skipped_micro_step_under_gradient_accumulation():
    # A corrupted micro-batch is dropped; the real step waits for k clean.
    k = 2
    params, grads = make_problem(seed=32, steps=8)
    bad = [[g.copy() for g in grads[0]]]
    bad[0][0][0, 0] = np.nan
    sequence = grads[:3] + bad + grads[3:]
    opt = AdamPlus(learning_rate=0.01, gradient_accumulation_steps=k,
                   skip_nonfinite=True)
    got, _ = run_optimizer(opt, params, sequence)
    want, _ = run_optimizer(
        AdamPlus(learning_rate=0.01, gradient_accumulation_steps=k), params,
        grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(opt.skipped_steps)) == 1


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


@pytest.mark.quick
def test_model_fit_compiled_skips_nan_batches(tmp_path):
    # jit_compile=True: XLA on TensorFlow, jax.jit on JAX; torch runs eager.
    jit = keras.backend.backend() != "torch"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)).astype("float32")
    y = rng.normal(size=(80, 1)).astype("float32")
    bad_batches = [2, 5]
    x_bad = x.copy()
    for b in bad_batches:
        x_bad[8 * b + 1, 0] = np.nan
    keep = np.concatenate([np.arange(8 * b, 8 * b + 8) for b in range(10)
                           if b not in bad_batches])
    runs = {}
    for name, data in (("skip", (x_bad, y)), ("clean", (x[keep], y[keep]))):
        model = _model()
        model.compile(optimizer=AdamPlus(learning_rate=0.01,
                                         skip_nonfinite=True),
                      loss="mse", jit_compile=jit)
        model.fit(*data, batch_size=8, epochs=2, shuffle=False, verbose=0)
        runs[name] = model
    for a, b in zip(runs["skip"].get_weights(), runs["clean"].get_weights()):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    opt = runs["skip"].optimizer
    assert int(keras.ops.convert_to_numpy(opt.skipped_steps)) == 4
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 16
    # The counter is saved and loaded with the model.
    path = os.path.join(tmp_path, "m.keras")
    runs["skip"].save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.skip_nonfinite is True
    assert int(keras.ops.convert_to_numpy(
        loaded.optimizer.skipped_steps)) == 4


@pytest.mark.parametrize("value, n", [(np.nan, 20), (np.inf, 3),
                                      (-np.inf, 20)])
def test_one_bad_coordinate_among_many_variables_is_found(value, n):
    # The check is one pass over all gradients (a sum; on torch, for 16 or
    # more tensors, torch's multi-tensor check); gradients whose sum
    # overflows but that are finite are still taken.
    variables = [keras.Variable(np.ones((50,), "float32")) for _ in range(n)]
    optimizer = AdamPlus(0.1, skip_nonfinite=True)
    grads = [np.full((50,), 3e38, "float32") for _ in range(n)]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads],
                    variables)
    assert int(keras.ops.convert_to_numpy(optimizer.skipped_steps)) == 0
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
    grads[n // 2][17] = value
    before = [keras.ops.convert_to_numpy(v).copy() for v in variables]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads],
                    variables)
    assert int(keras.ops.convert_to_numpy(optimizer.skipped_steps)) == 1
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), b)


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="TensorFlow's optimizer has no stateless_apply")
def test_stateless_apply_skips_a_nan_step_under_jit():
    variable = keras.Variable(np.ones((3,), "float32"))
    optimizer = AdamPlus(0.1, skip_nonfinite=True, average_decay=0.9)
    optimizer.build([variable])
    step = optimizer.stateless_apply
    if keras.backend.backend() == "jax":
        import jax

        step = jax.jit(step)
    state = [v.value for v in optimizer.variables]
    trainable = [variable.value]
    good = [keras.ops.convert_to_tensor(np.array([0.1, -0.2, 0.3],
                                                 "float32"))]
    bad = [keras.ops.convert_to_tensor(np.array([0.1, np.nan, 0.3],
                                                "float32"))]
    trainable, state = step(state, good, trainable)
    after_good = [to_numpy([x])[0] for x in trainable + state]
    trainable, state = step(state, bad, trainable)
    after_bad = [to_numpy([x])[0] for x in trainable + state]
    names = [v.name for v in optimizer.variables]
    for name, a, b in zip(["theta"] + names, after_good, after_bad):
        if name == "skipped_steps":
            assert (int(a), int(b)) == (0, 1)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert np.abs(after_good[0] - 1.0).min() > 0.05


def _traced_runner(optimizer, variables):
    """A compiled step of `optimizer` on `variables`, as training runs it.

    TF: `tf.function(jit_compile=True)` (XLA); JAX: `stateless_apply`
    under `jax.jit`, its results assigned back after each step; torch:
    `torch.compile`. In each, the flag is a traced value, so every write
    of the step is guarded by a select (see keras_adam_plus.nonfinite).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda g: optimizer.apply(g, variables),
                           jit_compile=True)
    if backend == "jax":
        import jax

        optimizer.build(variables)
        step = jax.jit(optimizer.stateless_apply)

        def run(grads):
            trainable, state = step([v.value for v in optimizer.variables],
                                    grads, [v.value for v in variables])
            for v, x in zip(variables, trainable):
                v.assign(x)
            for v, x in zip(optimizer.variables, state):
                v.assign(x)

        return run
    import torch

    return torch.compile(lambda g: optimizer.apply(g, variables))


TRACED_CONFIGS = {
    # theta written twice (decay, step), v_max, averages, beta products.
    "amsgrad_wd_average_schedule": dict(
        amsgrad=True, weight_decay=0.05, average_decay=0.9,
        beta_1=BetaDecay(0.9, 0.99)),
    # Keras writes the EMA and (every 2 steps) theta from it.
    "ema_overwrite_unscaled_wd": dict(
        use_ema=True, ema_overwrite_frequency=2, weight_decay=0.01,
        weight_decay_mode="decoupled_unscaled"),
    "gradient_accumulation": dict(gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("name", [
    # torch.compile costs ~20 s a config: one by default on torch.
    pytest.param(n, marks=pytest.mark.slow)
    if keras.backend.backend() == "torch" and i else n
    for i, n in enumerate(TRACED_CONFIGS)])
def test_traced_bad_step_leaves_every_variable_exactly(name):
    # A bad step in a compiled step: each variable of the optimizer and
    # the weights (with a constraint, applied by Keras after the step)
    # are bit-identical to their values before it; the step count and
    # the schedules do not advance. Then training goes on as if the bad
    # step had not been there.
    config = TRACED_CONFIGS[name]
    params, grads = make_problem(seed=33, steps=6)
    grads[3] = [g.copy() for g in grads[3]]
    grads[3][1][0] = np.nan
    runs = {}
    for label, steps in (("skip", grads), ("clean", grads[:3] + grads[4:])):
        optimizer = AdamPlus(learning_rate=0.01, skip_nonfinite=True,
                             **config)
        variables = make_variables(params)
        variables[0].constraint = keras.constraints.MaxNorm(1.5)
        run = _traced_runner(optimizer, variables)
        snapshots = []
        for g in steps:
            before = to_numpy(variables + optimizer.variables
                              if optimizer.built else variables)
            run([keras.ops.convert_to_tensor(x) for x in g])
            snapshots.append(before)
        runs[label] = (optimizer, variables, snapshots)
    optimizer, variables, snapshots = runs["skip"]
    names = ["theta"] * len(variables) + [v.name for v in
                                          optimizer.variables]
    # Step 3 was bad: the values after it (before step 4) are those before.
    for n, a, b in zip(names, snapshots[3], snapshots[4]):
        if n == "skipped_steps":
            assert (int(a), int(b)) == (0, 1)
        else:
            np.testing.assert_array_equal(a, b, err_msg=n)
    clean_optimizer, clean_variables, _ = runs["clean"]
    assert int(keras.ops.convert_to_numpy(optimizer.skipped_steps)) == 1
    for n, a, b in zip(names, to_numpy(variables + optimizer.variables),
                       to_numpy(clean_variables
                                + clean_optimizer.variables)):
        if n != "skipped_steps":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7,
                                       err_msg=n)


def test_mixed_float16_fit_compiled_with_the_loss_scale_optimizer():
    # mixed_float16 wraps AdamPlus in Keras's LossScaleOptimizer, which
    # passes the inner optimizer's Variables to stateless_apply (JAX): this
    # crashed under jax.jit. A NaN batch is skipped by the wrapper (the
    # inner step never sees it); the clean batches train.
    jit = keras.backend.backend() != "torch"
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _model()
        model.compile(optimizer=AdamPlus(learning_rate=0.01,
                                         skip_nonfinite=True),
                      loss="mse", jit_compile=jit)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(32, 6)).astype("float32")
        x[9, 2] = np.nan  # batch 1 of 4
        y = rng.normal(size=(32, 1)).astype("float32")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy(policy)
    inner = model.optimizer.inner_optimizer
    assert isinstance(inner, AdamPlus)
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 3
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="TensorFlow's optimizer has no stateless_apply")
def test_overwrite_with_gradient_variable_is_kept_on_a_skipped_step():
    # Keras assigns a variable with `overwrite_with_gradient` (float8
    # scales) its gradient itself: on a skipped step, compiled or not, it
    # keeps its value like every other variable.
    a = keras.Variable(np.ones(3, "float32"), name="a")
    b = keras.Variable(np.zeros(2, "float32"), name="b")
    b.overwrite_with_gradient = True
    optimizer = AdamPlus(0.1, skip_nonfinite=True)
    optimizer.build([a, b])
    step = optimizer.stateless_apply
    if keras.backend.backend() == "jax":
        import jax

        step = jax.jit(step)
    grads = [keras.ops.convert_to_tensor(np.array([1, np.nan, 1],
                                                  "float32")),
             keras.ops.convert_to_tensor(np.array([5, 5], "float32"))]
    trainable, state = step([v.value for v in optimizer.variables], grads,
                            [a.value, b.value])
    np.testing.assert_array_equal(to_numpy(trainable)[1], [0, 0])
    np.testing.assert_array_equal(to_numpy(trainable)[0], [1, 1, 1])
    names = [v.name for v in optimizer.variables]
    assert int(to_numpy([state[names.index("skipped_steps")]])[0]) == 1


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="torch.compile costs ~20 s; torch runs it eagerly "
                    "in test_one_bad_coordinate_among_many_variables_is_found")
def test_traced_overflowing_sum_of_finite_gradients_is_taken():
    # The compiled check sums each gradient; a sum that overflows on finite
    # values goes to the exact check (an ops.cond), which takes the step.
    variables = [keras.Variable(np.ones((50,), "float32")) for _ in range(3)]
    optimizer = AdamPlus(0.1, skip_nonfinite=True)
    run = _traced_runner(optimizer, variables)
    grads = [np.full((50,), 3e38, "float32") for _ in range(3)]
    run([keras.ops.convert_to_tensor(g) for g in grads])
    assert int(keras.ops.convert_to_numpy(optimizer.skipped_steps)) == 0
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
    grads[1][7] = np.inf
    run([keras.ops.convert_to_tensor(g) for g in grads])
    assert int(keras.ops.convert_to_numpy(optimizer.skipped_steps)) == 1
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
