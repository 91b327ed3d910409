"""beta_1/beta_2 as schedules or callables of the step, and BetaDecay.

The bias correction of scheduled betas is 1 - prod(beta_i) over the steps
taken, which the float64 reference computes independently.
"""

import os

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus, BetaDecay
from tests.helpers import make_problem, run_optimizer
from tests.reference import run_reference
from tests.test_update_rule import ATOL, RTOL


def _decay(beta, lam):
    return lambda step: beta * lam**step


@pytest.mark.parametrize("mode", [
    dict(),
    dict(epsilon_mode="hat", amsgrad=True),
    dict(nesterov=True),
    dict(adamax=True),
    dict(bias_correction=False, weight_decay=0.05),
], ids=str)
@pytest.mark.quick
def test_beta_decay_follows_reference(mode):
    config = dict(learning_rate=0.01, **mode)
    params, grads = make_problem(seed=41, steps=60)
    got, _ = run_optimizer(
        AdamPlus(beta_1=BetaDecay(0.9, 0.95), beta_2=0.99, **config),
        params, grads)
    want = run_reference(dict(beta_1=_decay(0.9, 0.95), beta_2=0.99,
                              **config), params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    constant = run_reference(dict(beta_1=0.9, beta_2=0.99, **config),
                             params, grads)
    assert np.abs(constant[0] - want[0]).max() > 1e-3


def test_callable_of_the_step_for_beta_2():
    def beta_2(step):
        return 0.999 - 0.1 * keras.ops.power(0.5, keras.ops.cast(
            step, "float32"))

    params, grads = make_problem(seed=42, steps=40)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, beta_2=beta_2),
                           params, grads)
    want = run_reference(dict(learning_rate=0.01,
                              beta_2=lambda s: 0.999 - 0.1 * 0.5**s),
                         params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_constant_schedule_equals_constant_beta():
    params, grads = make_problem(seed=43, steps=50)
    got, _ = run_optimizer(
        AdamPlus(learning_rate=0.01, beta_1=BetaDecay(0.9, 1.0)), params,
        grads)
    want, _ = run_optimizer(AdamPlus(learning_rate=0.01), params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.quick
def test_beta_schedule_survives_config_and_save_load(tmp_path):
    opt = AdamPlus(beta_1=BetaDecay(0.8, 0.9))
    again = AdamPlus.from_config(opt.get_config())
    assert isinstance(again.beta_1, BetaDecay)
    assert again.beta_1.get_config() == {"initial_beta": 0.8, "decay": 0.9}
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    model.fit(x, x[:, :2], batch_size=8, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer.beta_1, BetaDecay)
    powers = [keras.ops.convert_to_numpy(p) for p in opt._store.beta_powers]
    # 8 steps: prod of 0.8 * 0.9**s for s < 8.
    np.testing.assert_allclose(powers[0], np.prod(0.8 * 0.9**np.arange(8)),
                               rtol=1e-5)
    np.testing.assert_allclose(powers[1], 0.999**8, rtol=1e-6)
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial_beta=1.0), "Argument `initial_beta` must be in [0, 1). "
     "Received: initial_beta=1.0"),
    (dict(decay=0.0), "Argument `decay` must be in (0, 1]. "
     "Received: decay=0.0"),
])
def test_beta_decay_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        BetaDecay(**kwargs)
    assert str(info.value) == message


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="the fused fast path exists on PyTorch only")
def test_scheduled_betas_fall_back_visibly_on_torch():
    assert AdamPlus(beta_1=BetaDecay()).fast_path == (
        "generic (scheduled betas have no fused torch kernel)")


@pytest.mark.parametrize("mode", ["decoupled", "decoupled_unscaled", "l2"])
def test_weight_decay_schedule_follows_hand_computation(mode):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.2, decay_steps=5, decay_rate=0.5)
    params, grads = make_problem(seed=44, steps=30)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, weight_decay=schedule,
                                    weight_decay_mode=mode), params, grads)
    # The reference applies weight decay wd_t = 0.2 * 0.5**(t/5) per step.
    from tests.reference import ReferenceAdam

    ref = ReferenceAdam(weight_decay=1.0, weight_decay_mode=mode)
    want = [np.array(p, np.float64) for p in params]
    for t, step in enumerate(grads):
        ref.wd = 0.2 * 0.5 ** (t / 5)
        ref.step(want, step, 0.01)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    constant = run_reference(dict(learning_rate=0.01, weight_decay=0.2,
                                  weight_decay_mode=mode), params, grads)
    assert np.abs(constant[0] - want[0]).max() > 1e-3
    opt = AdamPlus(weight_decay=schedule)
    again = AdamPlus.from_config(opt.get_config())
    assert isinstance(again.weight_decay,
                      keras.optimizers.schedules.ExponentialDecay)
