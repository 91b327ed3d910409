"""AdamPlus with the rest of Keras: loss scaling, mixed precision, jit."""

import os

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(5)
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(1, dtype="float32")])


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_with_loss_scaling_trains_saves_loads(
        name, policy, tmp_path):
    policy(name)
    x, y = _data()
    model = _model()
    optimizer = keras.optimizers.LossScaleOptimizer(
        AdamPlus(learning_rate=0.01))
    model.compile(optimizer=optimizer, loss="mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=20, verbose=0)
    last = model.evaluate(x, y, verbose=0)
    assert np.isfinite(last) and last < 0.5 * first
    # Variables stay float32 under mixed precision; moments follow them.
    inner = model.optimizer.inner_optimizer
    assert isinstance(inner, AdamPlus)
    assert all(v.dtype == "float32" for v in inner.variables
               if "momentum" in v.path or "velocity" in v.path)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer.inner_optimizer
    assert isinstance(restored, AdamPlus)
    for a, b in zip(inner.variables, restored.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), last,
                               rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="torch's jit_compile (torch.compile, ~20 s a "
                    "model on 2 cores) is tested in test_regimes.py and in "
                    "the conformance matrix")
@pytest.mark.parametrize("config", [dict(), dict(amsgrad=True,
                                                  weight_decay=0.01),
                                    dict(adamax=True, nesterov=True)], ids=str)
def test_jit_compile_equals_eager_to_round_off(config):
    x, y = _data()
    weights = {}
    for jit in (False, True):
        model = _model()
        model.compile(optimizer=AdamPlus(learning_rate=0.01, **config),
                      loss="mse", jit_compile=jit,
                      run_eagerly=not jit and keras.backend.backend()
                      == "tensorflow")
        model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
        weights[jit] = model.get_weights()
    moved = np.abs(weights[True][0] - _model().get_weights()[0]).max()
    assert moved > 0.01
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cached_step_checks_still_refuse_and_overwrite():
    # AdamPlus runs Keras's per-step checks of the variable list once per
    # list; a new list is checked again.
    ones = keras.ops.ones
    known = [keras.Variable(np.ones(3), name="a"),
             keras.Variable(np.ones(2), name="b")]
    optimizer = AdamPlus()
    optimizer.build(known)
    for _ in range(2):
        optimizer.apply([ones(3), ones(2)], known)
    stranger = keras.Variable(np.ones(2), name="stranger")
    with pytest.raises(ValueError, match="Unknown variable"):
        optimizer.apply([ones(3), ones(2)], [known[0], stranger])
    # A variable Keras overwrites with its gradient (float8 scales).
    scale = keras.Variable(np.zeros(2), name="scale")
    scale.overwrite_with_gradient = True
    optimizer = AdamPlus()
    optimizer.build([known[0], scale])
    for value in (5.0, 7.0):
        optimizer.apply([ones(3), keras.ops.full((2,), value)],
                        [known[0], scale])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(scale),
                                      [value, value])
