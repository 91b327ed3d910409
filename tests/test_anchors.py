"""AdamPlus equals keras.optimizers.Adam, torch.optim.Adam/AdamW and optax.

Where the semantics are meant to match, the trajectories agree to float32
round-off. Where they differ, the test says how and why:

- keras.optimizers.Adam uses the "epsilon hat" form; AdamPlus matches it with
  `epsilon_mode="hat", epsilon=1e-7` (Keras's default epsilon).
- torch.optim.Adam's `weight_decay` is coupled L2 -> `weight_decay_mode="l2"`;
  torch.optim.AdamW decays by `lr * wd` -> `weight_decay_mode="decoupled"`.
- optax.amsgrad takes the maximum of the *bias-corrected* second moment,
  AdamPlus (like torch) the maximum of the raw moment, bias-corrected after.
  The two differ because 1 - beta_2**t grows with t, so they are not compared
  for equality; `test_optax_amsgrad_differs_only_by_max_order` pins the
  difference instead.
"""

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tests.helpers import make_problem, make_variables, run_optimizer
from tests.reference import run_reference

pytestmark = pytest.mark.quick

RTOL, ATOL = 2e-6, 2e-6

KERAS_CASES = [
    dict(),
    dict(amsgrad=True),
    dict(weight_decay=0.05),
    dict(amsgrad=True, weight_decay=0.05, beta_1=0.5, beta_2=0.99),
]


@pytest.mark.parametrize("kwargs", KERAS_CASES, ids=str)
def test_hat_mode_equals_keras_adam_step_for_step(kwargs):
    params, grads = make_problem(seed=7, steps=50)
    ours = AdamPlus(learning_rate=0.01, epsilon=1e-7, epsilon_mode="hat",
                    **kwargs)
    theirs = keras.optimizers.Adam(learning_rate=0.01, epsilon=1e-7, **kwargs)
    a, b = make_variables(params), make_variables(params)
    for step in grads:
        tensors = [keras.ops.convert_to_tensor(g) for g in step]
        ours.apply(tensors, a)
        theirs.apply(tensors, b)
        for x, y in zip(a, b):
            x = keras.ops.convert_to_numpy(x)
            y = keras.ops.convert_to_numpy(y)
            if keras.backend.backend() == "torch":
                # Keras's torch Adam runs torch._foreach kernels (and decays
                # by multiplying with 1 - lr*wd): float32 round-off only.
                np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)
            else:
                # Same operations in the same order: equal to the last bit.
                np.testing.assert_array_equal(x, y)


def test_keras_adam_default_differs_from_paper_mode():
    # The default epsilon conventions differ; early steps show it.
    params, grads = make_problem(seed=7, steps=3, scale=1e-6)
    ours, _ = run_optimizer(AdamPlus(), params, grads)
    theirs, _ = run_optimizer(keras.optimizers.Adam(), params, grads)
    assert np.abs(ours[0] - theirs[0]).max() > 1e-4


TORCH_CASES = [
    ("Adam", dict(), dict()),
    ("Adam", dict(amsgrad=True), dict(amsgrad=True)),
    ("Adam", dict(weight_decay=0.05), dict(weight_decay=0.05,
                                           weight_decay_mode="l2")),
    ("Adam", dict(amsgrad=True, weight_decay=0.05),
     dict(amsgrad=True, weight_decay=0.05, weight_decay_mode="l2")),
    ("AdamW", dict(weight_decay=0.05), dict(weight_decay=0.05)),
    ("AdamW", dict(amsgrad=True, weight_decay=0.05),
     dict(amsgrad=True, weight_decay=0.05)),
]


@pytest.mark.parametrize("name, theirs, ours", TORCH_CASES, ids=str)
def test_equals_torch(name, theirs, ours):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    params, grads = make_problem(seed=8, steps=100)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    opt = getattr(torch.optim, name)(tensors, lr=0.01, betas=(0.9, 0.99),
                                     eps=1e-8, **theirs)
    for step in grads:
        for t, g in zip(tensors, step):
            t.grad = torch.tensor(g)
        opt.step()
    got, _ = run_optimizer(
        AdamPlus(learning_rate=0.01, beta_2=0.99, **ours), params, grads
    )
    for g, t in zip(got, tensors):
        np.testing.assert_allclose(g, t.detach().numpy(), rtol=RTOL,
                                   atol=ATOL)


def _run_optax(transform, params, grads):
    import jax.numpy as jnp
    import optax

    p = [jnp.asarray(x) for x in params]
    state = transform.init(p)
    for step in grads:
        updates, state = transform.update([jnp.asarray(g) for g in step],
                                          state, p)
        p = optax.apply_updates(p, updates)
    return [np.asarray(x, np.float64) for x in p]


OPTAX_CASES = [
    ("adam", dict(), dict()),
    ("adamw", dict(weight_decay=0.05), dict(weight_decay=0.05)),
]


@pytest.mark.parametrize("name, theirs, ours", OPTAX_CASES, ids=str)
def test_equals_optax(name, theirs, ours):
    optax = pytest.importorskip("optax", reason="optax is not installed")
    params, grads = make_problem(seed=9, steps=100)
    want = _run_optax(getattr(optax, name)(0.01, b1=0.9, b2=0.99, eps=1e-8,
                                           **theirs), params, grads)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, beta_2=0.99, **ours),
                           params, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_optax_amsgrad_differs_only_by_max_order():
    optax = pytest.importorskip("optax", reason="optax is not installed")
    params, grads = make_problem(seed=10, steps=100)
    # Shrinking gradients make the running max matter.
    grads = [[g * 0.97**t for g in step] for t, step in enumerate(grads)]
    want = _run_optax(optax.amsgrad(0.01, b1=0.9, b2=0.99), params, grads)
    got, _ = run_optimizer(AdamPlus(learning_rate=0.01, beta_2=0.99,
                                    amsgrad=True), params, grads)
    assert np.abs(got[0] - want[0]).max() > 1e-4
    # A float64 max over bias-corrected v reproduces optax exactly.
    c = [np.array(p, np.float64) for p in params]
    m = [np.zeros_like(p) for p in c]
    v = [np.zeros_like(p) for p in c]
    vmax = [np.zeros_like(p) for p in c]
    for t, step in enumerate(grads, start=1):
        for i, g in enumerate(step):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.99 * v[i] + 0.01 * np.square(g, dtype="f8")
            vmax[i] = np.maximum(vmax[i], v[i] / (1 - 0.99**t))
            c[i] -= 0.01 * (m[i] / (1 - 0.9**t)) / (np.sqrt(vmax[i]) + 1e-8)
    for x, w in zip(c, want):
        np.testing.assert_allclose(x, w, rtol=RTOL, atol=ATOL)
    # ... while our raw-v ordering is the reference's (and torch's).
    ours = run_reference(dict(learning_rate=0.01, beta_2=0.99, amsgrad=True),
                         params, grads)
    np.testing.assert_allclose(got[0], ours[0], rtol=RTOL, atol=ATOL)
