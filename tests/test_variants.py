"""AdaMax (Algorithm 2) and Nesterov momentum against the float64 reference.

Both run the generic `update_step` on every backend (the torch fused path
falls back, which `test_variants_fall_back_visibly_on_torch` pins).
"""

import itertools

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tests.helpers import make_problem, run_optimizer
from tests.reference import run_reference
from tests.test_anchors import _run_optax
from tests.test_update_rule import ATOL, RTOL, _mode_id

WD = (None, "decoupled", "decoupled_unscaled", "l2")


def _wd(mode):
    return {} if mode is None else dict(weight_decay=0.05,
                                        weight_decay_mode=mode)


ADAMAX_MODES = [
    dict(adamax=True, nesterov=nesterov, bias_correction=bias, **_wd(wd))
    for nesterov, bias, wd in itertools.product((False, True),
                                                (True, False), WD)
]
NESTEROV_MODES = [
    dict(nesterov=True, epsilon_mode=eps, amsgrad=amsgrad,
         bias_correction=bias, **_wd(wd))
    for eps, amsgrad, bias, wd in itertools.product(
        ("paper", "hat"), (False, True), (True, False), (None, "l2"))
]


@pytest.mark.parametrize("mode", ADAMAX_MODES + NESTEROV_MODES, ids=_mode_id)
def test_100_steps_follow_reference(mode):
    config = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.99, **mode)
    params, grads = make_problem(seed=21, steps=100)
    got, _ = run_optimizer(AdamPlus(**config), params, grads)
    want = run_reference(config, params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    assert np.abs(want[0] - params[0]).max() > 0.05
    # The variant really changes the trajectory.
    plain = {k: v for k, v in config.items()
             if k not in ("adamax", "nesterov")}
    other = run_reference(plain, params, grads)
    assert np.abs(other[0] - want[0]).max() > 1e-3


@pytest.mark.quick
def test_adamax_first_step_is_lr_times_sign_exactly():
    # t=1: m = (1-b1) g, u = |g|, step = lr/(1-b1) * m/u = lr * sign(g);
    # a coordinate whose gradient is 0 has u = m = 0 and does not move.
    opt = AdamPlus(learning_rate=0.01, adamax=True)
    var = keras.Variable(np.array([1.0, 2.0, 3.0], "float32"))
    grad = keras.ops.convert_to_tensor(np.array([0.1, -0.2, 0.0], "float32"))
    opt.apply([grad], [var])
    np.testing.assert_array_max_ulp(
        keras.ops.convert_to_numpy(var),
        np.array([0.99, 2.01, 3.0], "float32"), maxulp=1,
    )


def test_adamax_never_divides_zero_by_zero():
    params, grads = make_problem(seed=22, steps=20)
    for step in grads:
        step[0][:, 1] = 0.0  # a column that never gets a gradient
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, adamax=True),
                           params, grads)
    assert all(np.isfinite(g).all() for g in got)
    np.testing.assert_array_equal(got[0][:, 1], params[0][:, 1])
    assert np.abs(got[0][:, 0] - params[0][:, 0]).max() > 0.05


@pytest.mark.quick
def test_adamax_equals_keras_and_optax_up_to_their_epsilon():
    # keras.optimizers.Adamax and optax.adamax add eps to u; with a tiny
    # eps and gradients of order 1 they agree with Algorithm 2.
    params, grads = make_problem(seed=23, steps=50)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, adamax=True),
                           params, grads)
    theirs, _ = run_optimizer(
        keras.optimizers.Adamax(learning_rate=0.01, epsilon=1e-12), params,
        grads,
    )
    for g, w in zip(got, theirs):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.quick
def test_nesterov_equals_optax():
    optax = pytest.importorskip("optax", reason="optax is not installed")
    params, grads = make_problem(seed=24, steps=100)
    want = _run_optax(optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-8,
                                 nesterov=True), params, grads)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, beta_2=0.99,
                                    nesterov=True), params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_variants_round_trip_the_config():
    opt = AdamPlus(adamax=True, nesterov=True)
    again = AdamPlus.from_config(opt.get_config())
    assert (again.adamax, again.nesterov) == (True, True)


@pytest.mark.quick
def test_adamax_with_amsgrad_is_refused():
    with pytest.raises(ValueError, match=r"Received: adamax=True, "
                                         r"amsgrad=True"):
        AdamPlus(adamax=True, amsgrad=True)


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="the fused fast path exists on PyTorch only")
def test_variants_fall_back_visibly_on_torch():
    assert AdamPlus(adamax=True).fast_path == (
        "generic (adamax has no fused torch kernel)")
    assert AdamPlus(nesterov=True).fast_path == (
        "generic (nesterov has no fused torch kernel)")

    class OwnStep(AdamPlus):
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)

    assert OwnStep().fast_path == "generic (OwnStep overrides update_step)"
