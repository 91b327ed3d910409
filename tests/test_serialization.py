"""Round trips: config, serialize, pickle, .keras, .weights.h5, resume."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus, BetaDecay
from tests.helpers import make_problem, make_variables, run_optimizer, to_numpy

pytestmark = pytest.mark.quick

RICH_CONFIGS = [
    dict(),
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.01, 100, 0.9), beta_1=0.5, beta_2=0.99, epsilon=1e-6,
        epsilon_mode="hat", amsgrad=True, bias_correction=False),
    dict(weight_decay=0.01, weight_decay_mode="l2",
         weight_decay_exclude=["bias$", "norm"], clipnorm=1.0),
    dict(weight_decay=0.1, weight_decay_mode="decoupled_unscaled",
         use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5,
         global_clipnorm=2.0, loss_scale_factor=128.0,
         gradient_accumulation_steps=4, name="my_adam"),
    dict(adamax=True, nesterov=True, skip_nonfinite=True,
         average_decay=0.999, moment_dtype="float32"),
    dict(beta_1=BetaDecay(0.9, 0.99), beta_2=BetaDecay(0.999, 1.0),
         weight_decay=keras.optimizers.schedules.ExponentialDecay(
             0.01, 10, 0.5)),
    dict(lazy_sparse=True, weight_decay=0.01),
    dict(state_format="4bit", state_format_min_size=128, amsgrad=True),
]


def _comparable(config):
    return json.loads(json.dumps(config))


@pytest.mark.parametrize("kwargs", RICH_CONFIGS, ids=range(len(RICH_CONFIGS)))
def test_config_round_trips(kwargs):
    opt = AdamPlus(**kwargs)
    config = opt.get_config()
    text = json.dumps(config)
    clone = AdamPlus.from_config(json.loads(text))
    assert _comparable(clone.get_config()) == _comparable(config)
    # serialize/deserialize finds the class by its registered name alone.
    data = keras.optimizers.serialize(opt)
    assert data["registered_name"] == "keras_adam_plus>AdamPlus"
    again = keras.optimizers.deserialize(json.loads(json.dumps(data)))
    assert type(again) is AdamPlus
    assert _comparable(again.get_config()) == _comparable(config)
    # pickle of an unbuilt optimizer keeps the config.
    unpickled = pickle.loads(pickle.dumps(opt))
    assert _comparable(unpickled.get_config()) == _comparable(config)


def test_every_config_key_is_an_init_argument():
    import inspect

    params = inspect.signature(AdamPlus.__init__).parameters
    assert set(AdamPlus().get_config()) <= set(params)


def test_pickle_keeps_state_of_built_optimizer():
    params, grads = make_problem(seed=11, steps=20)
    opt = AdamPlus(learning_rate=0.01, amsgrad=True)
    _, variables = run_optimizer(opt, params, grads[:10])
    clone = pickle.loads(pickle.dumps(opt))
    twins = make_variables(to_numpy(variables))
    clone.build(twins)
    for a, b in zip(opt.variables, clone.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    for step in grads[10:]:
        opt.apply([keras.ops.convert_to_tensor(g) for g in step], variables)
        clone.apply([keras.ops.convert_to_tensor(g) for g in step], twins)
    for a, b in zip(variables, twins):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(3),
    ])


def _data(n=64):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 6)).astype("float32"),
            rng.normal(size=(n, 3)).astype("float32"))


def _fit(model, epochs):
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)


def _optimizer_state(optimizer):
    # The state in Keras's per-variable layout (on JAX small variables
    # share flat slots: `optimizer.variables` holds those).
    return optimizer.get_weights()


LOAD_IN_NEW_PROCESS = textwrap.dedent("""
    import sys, json, numpy as np, keras
    import keras_adam_plus
    model = keras.models.load_model(sys.argv[1])
    opt = model.optimizer
    np.savez(sys.argv[2], *opt.get_weights())
    print(json.dumps({"class": type(opt).__name__,
                      "module": type(opt).__module__,
                      "config": opt.get_config(),
                      "iterations": int(opt.iterations.numpy())}))
""")


def test_keras_file_loads_in_new_process_with_state(tmp_path):
    model = _model()
    opt = AdamPlus(learning_rate=0.01, amsgrad=True, weight_decay=0.01,
                   weight_decay_exclude=["bias"])
    model.compile(optimizer=opt, loss="mse")
    _fit(model, 2)
    path = str(tmp_path / "m.keras")
    model.save(path)
    out = subprocess.run(
        [sys.executable, "-c", LOAD_IN_NEW_PROCESS, path,
         str(tmp_path / "state.npz")],
        capture_output=True, text=True, env=dict(os.environ), check=True,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["class"] == "AdamPlus"
    assert info["module"] == "keras_adam_plus.adam_plus"
    assert info["config"] == _comparable(opt.get_config())
    assert info["iterations"] == 8
    saved = np.load(tmp_path / "state.npz")
    state = _optimizer_state(opt)
    assert len(saved.files) == len(state) == 2 + 3 * 4
    for i, value in enumerate(state):
        np.testing.assert_array_equal(saved[f"arr_{i}"], value)


def test_weights_h5_restores_optimizer_state(tmp_path):
    model = _model()
    model.compile(optimizer=AdamPlus(learning_rate=0.01), loss="mse")
    _fit(model, 2)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = _model(seed=1)
    other.compile(optimizer=AdamPlus(learning_rate=0.01), loss="mse")
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    for a, b in zip(_optimizer_state(model.optimizer),
                    _optimizer_state(other.optimizer)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_state_that_does_not_fit_raises(tmp_path):
    model = _model()
    model.compile(optimizer=AdamPlus(amsgrad=True), loss="mse")
    _fit(model, 1)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    message = (
        r"Cannot load the state of optimizer 'adam_plus': the saved state "
        r"has velocity_max, which this optimizer does not keep\. The state "
        r"was saved by an optimizer of another configuration"
    )
    other = _model()
    other.compile(optimizer=AdamPlus(), loss="mse")
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match=message):
        other.load_weights(path)
    # Refused before build too: the kinds are known from the config.
    unbuilt = _model()
    unbuilt.compile(optimizer=AdamPlus(), loss="mse")
    with pytest.raises(ValueError, match=message):
        unbuilt.load_weights(path)


def test_resume_equals_uninterrupted(tmp_path):
    kwargs = dict(learning_rate=0.01, amsgrad=True, weight_decay=0.01)
    straight = _model()
    straight.compile(optimizer=AdamPlus(**kwargs), loss="mse")
    _fit(straight, 5)

    first = _model()
    first.compile(optimizer=AdamPlus(**kwargs), loss="mse")
    _fit(first, 2)
    path = str(tmp_path / "m.keras")
    first.save(path)
    keras.utils.clear_session()
    resumed = keras.models.load_model(path)
    _fit(resumed, 3)
    assert int(resumed.optimizer.iterations.numpy()) == 20
    # The CPU kernels of all three backends are deterministic here: exact.
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_optimizer_state(straight.optimizer),
                    _optimizer_state(resumed.optimizer)):
        np.testing.assert_array_equal(a, b)
