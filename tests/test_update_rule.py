"""AdamPlus against the float64 NumPy reference, in every mode combination."""

import itertools

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tests.helpers import make_problem, run_optimizer
from tests.reference import run_reference

pytestmark = pytest.mark.quick

# epsilon_mode x amsgrad x bias_correction x weight decay mode (None = off).
MODES = [
    dict(
        epsilon_mode=eps_mode,
        amsgrad=amsgrad,
        bias_correction=bias,
        **({} if wd_mode is None else dict(weight_decay=0.05,
                                            weight_decay_mode=wd_mode)),
    )
    for eps_mode, amsgrad, bias, wd_mode in itertools.product(
        ("paper", "hat"), (False, True), (True, False),
        (None, "decoupled", "decoupled_unscaled", "l2"),
    )
]

# float32 round-off over 100 steps of size ~lr: absolute error well below
# 1e-5 of parameters of order 1, relative error ~1e-6.
RTOL, ATOL = 2e-6, 2e-6


def _mode_id(mode):
    return "-".join(f"{k}={v}" for k, v in mode.items())


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_100_steps_follow_reference(mode):
    config = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.99,
                  epsilon=1e-8, **mode)
    params, grads = make_problem(seed=1, steps=100)
    got, _ = run_optimizer(AdamPlus(**config), params, grads)
    want = run_reference(config, params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    # The run moved the parameters far beyond the tolerance.
    assert np.abs(want[0] - params[0]).max() > 0.1


def test_tiny_and_huge_gradients_follow_reference():
    # Scale invariance (Section 2): eps is the only thing that breaks it.
    for scale in (1e-6, 1e4):
        config = dict(learning_rate=0.01)
        params, grads = make_problem(seed=2, steps=30, scale=scale)
        got, _ = run_optimizer(AdamPlus(**config), params, grads)
        want = run_reference(config, params, grads)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


# Hand-computed first step: var=[1, 2], g=[0.1, -0.2], lr=0.01, defaults.
# paper: m_hat = g, v_hat = g^2, step = lr * g / (|g| + 1e-8)
# hat:   step = lr * sqrt(1e-3) * g / (sqrt(1e-3) * |g| + 1e-7)
ONE_STEP = {
    "paper": [0.99000000099999990000001, 2.00999999950000002499999875],
    "hat": [0.99000031621776633305570, 2.00999984188861695205318764],
}


@pytest.mark.parametrize("epsilon_mode", ["paper", "hat"])
def test_exact_values_after_one_step(epsilon_mode):
    epsilon = 1e-8 if epsilon_mode == "paper" else 1e-7
    opt = AdamPlus(learning_rate=0.01, epsilon=epsilon,
                   epsilon_mode=epsilon_mode)
    var = keras.Variable(np.array([1.0, 2.0], "float32"))
    opt.apply([keras.ops.convert_to_tensor(np.array([0.1, -0.2], "float32"))],
              [var])
    got = keras.ops.convert_to_numpy(var)
    np.testing.assert_array_max_ulp(
        got, np.array(ONE_STEP[epsilon_mode], "float32"), maxulp=1
    )
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1


def test_weight_decay_exclude_by_regex_on_path():
    config = dict(learning_rate=0.01, weight_decay=0.1)
    params, grads = make_problem(seed=3, steps=20)
    opt = AdamPlus(weight_decay_exclude=["bias$"], **config)
    got, _ = run_optimizer(opt, params, grads, names=["kernel", "bias"])
    want = run_reference(dict(config, decay_mask=[True, False]), params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    # Without the exclusion the bias ends elsewhere.
    decayed = run_reference(config, params, grads)
    assert np.abs(decayed[1] - want[1]).max() > 1e-4


def test_keras_exclude_from_weight_decay_is_honoured():
    config = dict(learning_rate=0.01, weight_decay=0.1)
    params, grads = make_problem(seed=3, steps=20)
    opt = AdamPlus(**config)
    opt.exclude_from_weight_decay(var_names=["bias"])
    got, _ = run_optimizer(opt, params, grads, names=["kernel", "bias"])
    want = run_reference(dict(config, decay_mask=[True, False]), params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_decoupled_decay_with_zero_gradient_is_exactly_geometric():
    # Loshchilov & Hutter: zero gradient, theta shrinks by (1 - lr*wd)/step.
    for mode, factor in (("decoupled", 1 - 0.1 * 0.5),
                         ("decoupled_unscaled", 1 - 0.5)):
        opt = AdamPlus(learning_rate=0.1, weight_decay=0.5,
                       weight_decay_mode=mode)
        var = keras.Variable(np.array([4.0], "float32"))
        zero = keras.ops.zeros((1,))
        for _ in range(3):
            opt.apply([zero], [var])
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(var), [4.0 * factor**3], rtol=1e-6
        )


def test_learning_rate_schedule_matches_hand_computation():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=10, decay_rate=0.5
    )
    params, grads = make_problem(seed=4, steps=40)
    got, _ = run_optimizer(AdamPlus(learning_rate=schedule), params, grads)
    want = run_reference({}, params, grads,
                         lr_of_step=lambda t: 0.05 * 0.5 ** (t / 10))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_callable_learning_rate():
    params, grads = make_problem(seed=4, steps=10)
    got, _ = run_optimizer(AdamPlus(learning_rate=lambda: 0.02), params, grads)
    want = run_reference({"learning_rate": 0.02}, params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def _clip_by_norm(g, c):
    n = np.sqrt(np.sum(np.square(g, dtype=np.float64)))
    return g * c / max(n, c)


@pytest.mark.parametrize(
    "kwargs, clip",
    [
        (dict(clipnorm=0.5), lambda gs: [_clip_by_norm(g, 0.5) for g in gs]),
        (dict(clipvalue=0.3), lambda gs: [np.clip(g, -0.3, 0.3) for g in gs]),
        (
            dict(global_clipnorm=0.7),
            lambda gs: [
                g * 0.7 / max(0.7, np.sqrt(sum(np.sum(np.square(x, dtype="f8"))
                                             for x in gs)))
                for g in gs
            ],
        ),
    ],
    ids=["clipnorm", "clipvalue", "global_clipnorm"],
)
def test_clipping_equals_clipping_by_hand(kwargs, clip):
    params, grads = make_problem(seed=5, steps=30)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, **kwargs), params,
                           grads)
    want = run_reference({"learning_rate": 0.01}, params,
                         [clip(gs) for gs in grads])
    unclipped = run_reference({"learning_rate": 0.01}, params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    assert any(np.abs(w - u).max() > 1e-4 for w, u in zip(want, unclipped))


@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_gradient_accumulation_equals_averaged_gradients(weight_decay):
    k = 3
    params, micro = make_problem(seed=6, steps=4 * k)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    )
    opt = AdamPlus(learning_rate=schedule, gradient_accumulation_steps=k,
                   weight_decay=weight_decay)
    got, _ = run_optimizer(opt, params, micro)
    averaged = [
        [np.mean([micro[s * k + j][i] for j in range(k)], axis=0)
         for i in range(len(params))]
        for s in range(4)
    ]
    # Bias correction, weight decay and the schedule count real steps.
    want = run_reference({"weight_decay": weight_decay}, params, averaged,
                         lr_of_step=lambda t: 0.05 * 0.5 ** (t / 2))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 4
