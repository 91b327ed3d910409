"""The AdamPlus update rule, written once: pure `keras.ops` functions.

Every path derives from this module: the generic `update_step`, the
TensorFlow lazy (sparse) path and the torch fused kernel's mapping of modes.
It knows nothing of the optimizer object: it takes tensors and plain Python
scalars (betas, epsilon, learning rate, step) and returns tensors.

Precision (shared/STYLE.md, rule 5):

- Per-step scalars (bias corrections, step size, scaled epsilon, decays)
  are computed in the *compute dtype*: float64 for float64 variables,
  float32 for every other float (bfloat16 and float16 included: in bfloat16
  `0.999` is `1.0`, so `1 - beta_2**t` would be 0; in float16 `1e-8` is 0).
- Python constants are converted exactly into that dtype (never through a
  float32 tensor first, which TensorFlow's `cast` does).
- The elementwise math of a step also runs in the compute dtype; each slot
  is rounded to its storage dtype once, when it is written (as torch's
  fused kernels do for half-precision weights).
"""

import collections

import keras
import numpy as np
from keras import ops

# The arguments of the rule, as plain Python values.
Hyper = collections.namedtuple("Hyper", [
    "beta_1", "beta_2", "epsilon", "epsilon_mode", "amsgrad",
    "bias_correction", "adamax", "nesterov", "weight_decay_mode",
])

# Per-step scalars, all tensors of the compute dtype (None where unused).
Scalars = collections.namedtuple("Scalars", [
    "dtype", "lr", "one_minus_beta_1", "one_minus_beta_2", "beta_1",
    "beta_2", "c1", "c2", "c1_next", "step_size", "alpha", "epsilon",
    "weight_decay",
])


def compute_dtype(dtype):
    """The dtype a variable of `dtype` is updated in: float64 or float32."""
    return "float64" if dtype == "float64" else "float32"


def constant(value, dtype):
    """A Python number as a scalar tensor of `dtype`, converted exactly."""
    if keras.backend.backend() == "torch":
        # `torch.as_tensor` of the Python number: exact, and no NumPy
        # array for `torch.compile` to trace (a graph break).
        return ops.convert_to_tensor(value, dtype=dtype)
    return ops.convert_to_tensor(np.asarray(value, dtype=dtype))


def as_dtype(value, dtype):
    """`value` (a Python number or a tensor) as a tensor of `dtype`."""
    if isinstance(value, (int, float)):
        return constant(value, dtype)
    return ops.cast(value, dtype)


def step_scalars(hyper, dtype, step, learning_rate, betas=None,
                 beta_1_next=None, beta_powers=None, weight_decay=None):
    """The scalars of step `t = step + 1`, in compute dtype `dtype`.

    Args:
        hyper: A `Hyper`.
        dtype: "float32" or "float64".
        step: The 0-based step count (a scalar tensor).
        learning_rate: alpha of this step (a tensor or a float).
        betas: `(beta_1, beta_2)` of this step when scheduled, else None
            (the constants in `hyper` are used).
        beta_1_next: Scheduled beta_1 of the next step (Nesterov only).
        beta_powers: With scheduled betas, `(prod beta_1, prod beta_2)`
            over the steps before this one; the corrections are then
            `1 - prod_{i<=t} beta_i` (so the weights still sum to 1).
        weight_decay: This step's weight decay (a tensor or a float), or
            None.

    Returns:
        A `Scalars`. `c1 = 1 - beta_1**t`, `c2 = 1 - beta_2**t`,
        `c1_next = 1 - beta_1**(t+1)` (Nesterov), `alpha = lr * sqrt(c2) /
        c1 = step_size / c1` (`step_size = lr` for AdaMax or without bias
        correction), and `epsilon` the epsilon added to `sqrt(v)` (the
        paper's epsilon times `sqrt(c2)` in "paper" mode, so that `alpha * m /
        (sqrt(v) + epsilon)` is Algorithm 1's `lr * m_hat / (sqrt(v_hat) +
        eps)`, the rearrangement at the end of the paper's Section 2).
    """
    lr = as_dtype(learning_rate, dtype)
    one = constant(1.0, dtype)
    if betas is None:
        beta_1 = constant(hyper.beta_1, dtype)
        beta_2 = constant(hyper.beta_2, dtype)
        one_minus_beta_1 = constant(1.0 - hyper.beta_1, dtype)
        one_minus_beta_2 = constant(1.0 - hyper.beta_2, dtype)
    else:
        beta_1, beta_2 = (as_dtype(b, dtype) for b in betas)
        one_minus_beta_1, one_minus_beta_2 = one - beta_1, one - beta_2
    epsilon = constant(hyper.epsilon, dtype)
    c1 = c2 = c1_next = one
    if hyper.bias_correction:
        if beta_powers is None:
            t = ops.cast(step + 1, dtype)
            c1 = one - ops.power(beta_1, t)
            c2 = one - ops.power(beta_2, t)
            if hyper.nesterov:
                c1_next = one - ops.power(beta_1, t + one)
        else:
            p1 = ops.multiply(as_dtype(beta_powers[0], dtype), beta_1)
            p2 = ops.multiply(as_dtype(beta_powers[1], dtype), beta_2)
            c1, c2 = one - p1, one - p2
            if hyper.nesterov:
                c1_next = one - ops.multiply(p1, as_dtype(beta_1_next,
                                                          dtype))
    step_size = lr
    if hyper.bias_correction and not hyper.adamax:
        sqrt_c2 = ops.sqrt(c2)
        step_size = lr * sqrt_c2
        if hyper.epsilon_mode == "paper":
            epsilon = ops.multiply(epsilon, sqrt_c2)
    # A subnormal epsilon (1e-37 * sqrt(c2) in "paper" mode) is flushed to
    # zero by XLA and TensorFlow's CPU kernels, and then 0 / (0 + 0) is NaN
    # where a coordinate's gradient was always zero. Adding the smallest
    # normal number of the compute dtype keeps it normal, and leaves any
    # epsilon above 2**24 times that (1e-31 in float32) exactly as it is.
    # (Not `ops.maximum`: on torch it returns float32 for float64 scalars.)
    epsilon = ops.add(epsilon, constant(np.finfo(dtype).tiny, dtype))
    alpha = step_size / c1
    if weight_decay is not None:
        weight_decay = as_dtype(weight_decay, dtype)
    return Scalars(dtype, lr, one_minus_beta_1, one_minus_beta_2, beta_1,
                   beta_2, c1, c2, c1_next, step_size, alpha, epsilon,
                   weight_decay)


def decay(hyper, s, theta, gradient):
    """Weight decay: `(gradient, decrement of theta)` (either may change).

    "l2": g + lambda * theta (torch Adam); "decoupled": theta * lambda *
    lr (Keras AdamW, its operation order); "decoupled_unscaled": theta *
    lambda (Loshchilov & Hutter, 2019).
    """
    if hyper.weight_decay_mode == "l2":
        return ops.add(gradient, ops.multiply(s.weight_decay, theta)), None
    if hyper.weight_decay_mode == "decoupled":
        return gradient, theta * s.weight_decay * s.lr
    return gradient, ops.multiply(theta, s.weight_decay)


def step(hyper, s, gradient, state, decays):
    """One step of the rule, in its order, through `state`.

    The sequence every path takes (the generic step, a JAX group, the TF
    sparse rows): weight decay, then m, then v (AdaMax: u), then v_max
    (AMSGrad), then theta's decrement. `state` owns where the values live;
    it provides `theta()` (theta in the compute dtype), `sub_theta(delta)`
    (`delta` may be None), `read(kind)`, `add(kind, old, increment)` and
    `put(kind, new)` for the kinds "m", "v", "v_max" (both writes return
    the new value in the compute dtype). `gradient` is in the compute
    dtype.
    """
    if decays:
        gradient, decrement = decay(hyper, s, state.theta(), gradient)
        state.sub_theta(decrement)
    m = state.read("m")
    m = state.add("m", m, first_moment_increment(s, gradient, m))
    v = state.read("v")
    if hyper.adamax:
        v = state.put("v", infinity_norm(s, gradient, v))
    else:
        v = state.add("v", v, second_moment_increment(s, gradient, v))
    if hyper.amsgrad:
        v = state.put("v_max", maximum(state.read("v_max"), v))
    state.sub_theta(direction(hyper, s, gradient, m, v))


def first_moment_increment(s, gradient, m):
    """`m_t - m_{t-1} = (1 - beta_1) * (g - m_{t-1})` (Algorithm 1)."""
    return ops.multiply(ops.subtract(gradient, m), s.one_minus_beta_1)


def second_moment_increment(s, gradient, v):
    """`v_t - v_{t-1} = (1 - beta_2) * (g**2 - v_{t-1})` (Algorithm 1)."""
    return ops.multiply(ops.subtract(ops.square(gradient), v),
                        s.one_minus_beta_2)


def infinity_norm(s, gradient, u):
    """AdaMax's `u_t = max(beta_2 * u_{t-1}, |g|)` (Algorithm 2)."""
    return maximum(ops.multiply(u, s.beta_2), ops.abs(gradient))


def direction(hyper, s, gradient, m, v):
    """The decrement of theta, given the updated m and v (or v_max, or u).

    Adam: `alpha * m / (sqrt(v) + epsilon)` in keras.optimizers.Adam's
    operation order, both epsilon modes (see `step_scalars`); without bias
    correction `lr * m / (sqrt(v) + epsilon)`, RMSProp with momentum
    (Section 6.4). Nesterov (optax's form) replaces `m / c1` by
    `beta_1 * m / c1_next + (1 - beta_1) * g / c1`. AdaMax: `lr / c1 * m /
    u`, 0 where `u == 0` (there `m == 0` too).
    """
    m, v = ops.convert_to_tensor(m), ops.convert_to_tensor(v)
    if not (hyper.adamax or hyper.nesterov):
        return ops.divide(ops.multiply(m, s.alpha),
                          ops.add(ops.sqrt(v), s.epsilon))
    if hyper.nesterov:
        numerator = ops.add(
            ops.multiply(m, s.beta_1 / s.c1_next),
            ops.multiply(gradient, s.one_minus_beta_1 / s.c1),
        )
        scale = s.step_size
    else:
        numerator, scale = m, s.alpha
    if hyper.adamax:
        one = constant(1.0, s.dtype)
        denominator = ops.where(ops.greater(v, constant(0.0, s.dtype)), v,
                                one)
        return ops.multiply(ops.divide(numerator, denominator), scale)
    return ops.divide(ops.multiply(numerator, scale),
                      ops.add(ops.sqrt(v), s.epsilon))


def maximum(x, y):
    """Elementwise max that keeps float64 on every backend.

    Keras 3.15's `ops.maximum` on the torch backend computes float64 inputs
    in float32 (its result_type does not know torch dtypes); `where`
    keeps the inputs' dtype.
    """
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    return ops.where(ops.greater(y, x), y, x)
