"""average_decay: the paper's Section 7.2 temporal averaging."""

import os

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tests.helpers import make_problem, run_optimizer, to_numpy
from tests.reference import run_reference_average
from tests.test_update_rule import ATOL, RTOL


@pytest.mark.parametrize("config", [dict(), dict(amsgrad=True,
                                                  weight_decay=0.05)],
                         ids=str)
def test_bias_corrected_average_follows_reference(config):
    params, grads = make_problem(seed=51, steps=40)
    opt = AdamPlus(learning_rate=0.01, average_decay=0.9, **config)
    got, variables = run_optimizer(opt, params, grads)
    want, want_avg = run_reference_average(dict(learning_rate=0.01, **config),
                                           params, grads, 0.9)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    averaged = [keras.ops.convert_to_numpy(a)
                for a in opt.average_weights(variables)]
    for a, w in zip(averaged, want_avg):
        np.testing.assert_allclose(a, w, rtol=RTOL, atol=ATOL)
    # The average lags the weights: it is not a copy of them.
    assert np.abs(averaged[0] - got[0]).max() > 1e-3


def test_first_average_is_the_weights_and_before_any_step_too():
    params, grads = make_problem(seed=52, steps=1)
    opt = AdamPlus(learning_rate=0.01, average_decay=0.99)
    variables = [keras.Variable(p) for p in params]
    opt.build(variables)
    before = to_numpy(opt.average_weights())
    for b, p in zip(before, params):
        np.testing.assert_array_equal(b, p)
    opt.apply([keras.ops.convert_to_tensor(g) for g in grads[0]], variables)
    # t = 1: (1 - b) theta / (1 - b) = theta.
    for a, v in zip(to_numpy(opt.average_weights()), to_numpy(variables)):
        np.testing.assert_allclose(a, v, rtol=1e-5)


@pytest.mark.quick
def test_average_advances_once_per_real_step_under_accumulation():
    k = 3
    params, micro = make_problem(seed=53, steps=5 * k)
    averaged_grads = [[np.mean([micro[s * k + j][i] for j in range(k)],
                               axis=0) for i in range(len(params))]
                      for s in range(5)]
    opt = AdamPlus(learning_rate=0.01, average_decay=0.8,
                   gradient_accumulation_steps=k)
    _, variables = run_optimizer(opt, params, micro)
    _, want_avg = run_reference_average(dict(learning_rate=0.01), params,
                                        averaged_grads, 0.8)
    for a, w in zip(to_numpy(opt.average_weights(variables)), want_avg):
        np.testing.assert_allclose(a, w, rtol=RTOL, atol=ATOL)


def test_swap_in_for_evaluation_and_saving_then_back(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    opt = AdamPlus(learning_rate=0.05, average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
    model.fit(x, x[:, :3], batch_size=8, epochs=3, verbose=0)
    trained = model.get_weights()
    averages = to_numpy(opt.average_weights())
    path = os.path.join(tmp_path, "avg.weights.h5")
    with opt.use_average_weights():
        for w, a in zip(model.get_weights(), averages):
            np.testing.assert_allclose(w, a, rtol=1e-6)
        model.save_weights(path)
    for w, t in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(w, t)
    assert any(np.abs(a - t).max() > 1e-3 for a, t in zip(averages, trained))
    # The averages are saved optimizer state: a .keras round trip keeps them.
    model.save(os.path.join(tmp_path, "m.keras"))
    loaded = keras.models.load_model(os.path.join(tmp_path, "m.keras"))
    assert loaded.optimizer.average_decay == 0.9
    for a, b in zip(to_numpy(loaded.optimizer.average_weights()), averages):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_average_weights_needs_the_option():
    with pytest.raises(ValueError, match="average_decay=None"):
        AdamPlus().average_weights()


def test_average_decay_is_validated():
    with pytest.raises(ValueError, match=r"Argument `average_decay` must be "
                       r"in \[0, 1\)\. Received: average_decay=1.0"):
        AdamPlus(average_decay=1.0)
