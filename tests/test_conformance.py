"""The conformance matrix: modes x dtypes x executions, on every backend.

Every cell trains one (2, 3) weight for a few steps, with fixed gradients
that hold a zero coordinate and a tiny one, and compares the result with
the float64 NumPy reference (tests/reference.py). For float16/bfloat16
weights the reference keeps its state exact and rounds theta to the
weights' dtype after every step, as AdamPlus does.

The full product (15 modes x 4 dtypes x 5 executions, 300 cells per
backend) is sampled by pairs (tests/pairwise.py): every mode meets every
dtype and every execution, and every dtype every execution, in 75 cells
per backend (60 on TensorFlow, which has no stateless_apply). Executions:

- "apply": eager `optimizer.apply`;
- "fit": `model.fit` (TF: tf.function, JAX: jax.jit, torch: eager);
- "jit": `model.fit` with `jit_compile=True` (TF: XLA, JAX: jax.jit,
  torch: torch.compile; on torch, at ~20 s a cell, one cell per dtype runs
  by default and the rest with --runslow);
- "stateless": `jax.jit(optimizer.stateless_apply)` on JAX, eager
  `stateless_apply` on torch, each step checked pure (inputs unchanged);
  TensorFlow has no stateless_apply;
- "loop": a custom loop (GradientTape / jax.grad / torch autograd) and
  `optimizer.apply`.

Gradient flow in "fit" and "jit": the model is `y = sum(w * x)` with the
loss `y` and batches of one, so the gradient of step t is x_t exactly.
"""

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, BetaDecay
from tests.pairwise import all_pairs
from tests.reference import run_reference, run_reference_average

BACKEND = keras.backend.backend()
SHAPE = (2, 3)
STEPS = 6
# 2**-4: exact in float32, the dtype of Keras's learning-rate variable, so
# float64 cells see exactly the reference's learning rate.
LR = 0.0625

MODES = {
    "adam": {},
    "amsgrad": dict(amsgrad=True),
    "adamax": dict(adamax=True),
    "nesterov": dict(nesterov=True),
    "hat": dict(epsilon_mode="hat", epsilon=1e-7),
    "decoupled": dict(weight_decay=0.1, weight_decay_mode="decoupled"),
    "decoupled_unscaled": dict(weight_decay=0.01,
                               weight_decay_mode="decoupled_unscaled"),
    "l2": dict(weight_decay=0.1, weight_decay_mode="l2"),
    "no_bias_correction": dict(bias_correction=False),
    "scheduled_betas": dict(beta_1=BetaDecay(0.9, 0.9)),
    "average": dict(average_decay=0.9),
    "moment_dtype": dict(moment_dtype="float32"),
    "scheduled_weight_decay": dict(
        weight_decay=keras.optimizers.schedules.ExponentialDecay(
            0.2, decay_steps=1, decay_rate=0.5),
        weight_decay_mode="decoupled"),
    # One step's gradients hold a NaN: that step is skipped.
    "skip_nonfinite": dict(skip_nonfinite=True),
    "amsgrad_hat_l2": dict(amsgrad=True, epsilon_mode="hat",
                           weight_decay=0.1, weight_decay_mode="l2"),
}
DTYPES = ["float32", "float64", "bfloat16", "float16"]
EXECUTIONS = ["apply", "fit", "jit", "stateless", "loop"]
if BACKEND == "tensorflow":
    EXECUTIONS.remove("stateless")  # TF's optimizer refuses it

# "one": the (2, 3) weight is one variable; "split": its rows are two
# variables of shape (3,), which the JAX backend updates as one group with
# flat slots (`group_small_variables=True`, backends/jax_grouped.py) and
# torch's fused kernel in one call.
LAYOUTS = ["one", "split"]
# The state's format (issue 22): "8bit"/"4bit" cells quantize every
# variable (`state_format_min_size=1`: blocks of 6 or 3 values), and the
# reference stores m, v, v_max through its own quantizer
# (`reference_quantize`, written apart from the package) after each step,
# so that a cell is checked to the codes' own rounding. float64 weights
# keep the native format (documented), and so does their reference.
# Split cells of another format have no JAX groups (refused with them).
FORMATS = ["native", "8bit", "4bit"]
STATE_BITS = {"8bit": 8, "4bit": 4}
COLUMNS = (list(MODES), DTYPES, EXECUTIONS, LAYOUTS, FORMATS)
CELLS = all_pairs(list(COLUMNS))


def _params(cells):
    """pytest params of the cells. On torch, torch.compile costs ~20 s a
    cell on 2 cores (a low-bit step ~40 s): the default run keeps the first
    "jit" cell of each dtype with native state and the first with low-bit
    state; the other mode x jit cells run with --runslow (marked slow)."""
    seen, params = set(), []
    for cell in cells:
        marks = ()
        if BACKEND == "torch" and cell[2] == "jit":
            key = cell[1] if cell[4] == "native" else "low-bit"
            if key in seen:
                marks = (pytest.mark.slow,)
            seen.add(key)
        params.append(pytest.param(*cell, marks=marks, id="-".join(cell)))
    return params


NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32,
                "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Largest deviation allowed from the reference, per dtype. float32/64:
# round-off of a few steps. Half precisions: the reference stores theta
# (and, without moment_dtype, m and v) rounded to the dtype as AdamPlus
# does, so the two differ only where float32 and float64 arithmetic round
# a stored value differently: 2 spacings of the largest weight.
RTOL = {"float64": 1e-12, "float32": 2e-6}


def _tolerance(dtype, want):
    if dtype in RTOL:
        return dict(rtol=RTOL[dtype], atol=RTOL[dtype])
    spacing = float(np.max(np.abs(want)).astype(NUMPY_DTYPES[dtype]))
    spacing = np.spacing(np.asarray(spacing, NUMPY_DTYPES[dtype]))
    return dict(rtol=0, atol=2 * float(spacing))


def _round(values, dtype):
    """`values` rounded to `dtype`, as float64."""
    return np.asarray(values).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


def _problem(dtype):
    rng = np.random.default_rng(7)
    theta = rng.normal(size=SHAPE) + 1.0
    grads = [rng.normal(size=SHAPE) * 0.5 for _ in range(STEPS)]
    for g in grads:
        g[0, 0] = 0.0                      # a zero-gradient coordinate
        g[0, 1] = 1e-6 * (1 + g[0, 1])     # a tiny one
    # Keras's data adapters feed float64 inputs to fit as float32: keep
    # the gradients float32-exact so that every execution sees the same.
    grad_dtype = "float32" if dtype == "float64" else dtype
    return _round(theta, dtype), [_round(g, grad_dtype) for g in grads]


def _numpy(value):
    value = ops.convert_to_tensor(value)
    if keras.backend.standardize_dtype(value.dtype) in ("bfloat16",
                                                         "float16"):
        value = ops.cast(value, "float32")
    return np.asarray(ops.convert_to_numpy(value), np.float64)


# ------------------------------------------------------------ executions --

def _parts(value, layout):
    """`value` (a (2, 3) array) as the layout's variables' values."""
    return [value] if layout == "one" else [value[0], value[1]]


def _variables(theta, dtype, layout):
    return [keras.Variable(part, dtype=dtype, name=f"w{i}")
            for i, part in enumerate(_parts(theta, layout))]


def _apply(optimizer, dtype, theta, grads, layout):
    variables = _variables(theta, dtype, layout)
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(x, dtype)
                         for x in _parts(g, layout)], variables)
    return variables


class _Linear(keras.layers.Layer):
    """y = sum(w * x): the gradient of the loss y is x."""

    def __init__(self, theta, layout, **kwargs):
        super().__init__(**kwargs)
        self.theta, self.layout = theta, layout

    def build(self, input_shape):
        self.ws = [
            self.add_weight(shape=part.shape, name=f"w{i}",
                            initializer=keras.initializers.Constant(part))
            for i, part in enumerate(_parts(self.theta, self.layout))]

    def call(self, x):
        if self.layout == "one":
            return ops.sum(ops.multiply(self.ws[0], x), axis=(1, 2))[:, None]
        return sum(ops.sum(ops.multiply(w, x[:, i]), axis=1)[:, None]
                   for i, w in enumerate(self.ws))


def _fit(optimizer, dtype, theta, grads, layout, jit_compile=False):
    layer = _Linear(theta, layout, dtype=dtype)
    model = keras.Sequential([keras.Input(SHAPE, dtype=dtype), layer])
    model.compile(optimizer=optimizer, loss=lambda y_true, y_pred: y_pred,
                  jit_compile=jit_compile)
    x = np.stack(grads).astype(NUMPY_DTYPES[dtype])
    model.fit(x, np.zeros((len(grads), 1), "float32"), batch_size=1,
              epochs=1, shuffle=False, verbose=0)
    return layer.ws


def _stateless(optimizer, dtype, theta, grads, layout):
    variables = _variables(theta, dtype, layout)
    optimizer.build(variables)
    trainable = [v.value for v in variables]
    state = [v.value for v in optimizer.variables]
    step = optimizer.stateless_apply
    if BACKEND == "jax":
        import jax

        step = jax.jit(step)
    for g in grads:
        inputs = [_numpy(x) for x in trainable + state]
        new_trainable, new_state = step(
            state, [ops.convert_to_tensor(x, dtype)
                    for x in _parts(g, layout)], trainable)
        # Pure: the caller's tensors are unchanged.
        for before, x in zip(inputs, trainable + state):
            np.testing.assert_array_equal(_numpy(x), before)
        trainable, state = new_trainable, new_state
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 0
    return trainable


def _gradient(variable, x):
    """d/dw sum(w * x) by the backend's own autodiff."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(variable.value * x)
        return tape.gradient(loss, variable.value)
    if BACKEND == "jax":
        import jax

        return jax.grad(lambda w: (w * x).sum())(variable.value)
    import torch

    w = variable.value
    return torch.autograd.grad((w * x).sum(), w)[0]


def _loop(optimizer, dtype, theta, grads, layout):
    variables = _variables(theta, dtype, layout)
    for g in grads:
        optimizer.apply([_gradient(v, ops.convert_to_tensor(x, dtype))
                         for v, x in zip(variables, _parts(g, layout))],
                        variables)
    return variables


RUNNERS = {
    "apply": _apply,
    "fit": _fit,
    "jit": lambda *args: _fit(*args, jit_compile=True),
    "stateless": _stateless,
    "loop": _loop,
}


def _x64(dtype):
    """JAX computes float64 only with x64 on: enable it for the cell."""
    if BACKEND == "jax" and dtype == "float64":
        import jax

        return jax.enable_x64(True)
    import contextlib

    return contextlib.nullcontext()


def _reference_config(mode):
    config = {k: v for k, v in MODES[mode].items()
              if k not in ("average_decay", "moment_dtype",
                           "skip_nonfinite")}
    return dict(config, learning_rate=LR)


def _joined(values):
    """The layout's variables' values as the (2, 3) weight."""
    return np.reshape(np.stack([_numpy(v) for v in values]), SHAPE)


@pytest.mark.parametrize("mode, dtype, execution, layout, state_format",
                         _params(CELLS))
def test_cell_follows_the_float64_reference(mode, dtype, execution, layout,
                                            state_format):
    theta, grads = _problem(dtype)
    reference_grads = grads
    if mode == "skip_nonfinite":
        grads = [g.copy() for g in grads]
        grads[2][1, 1] = np.nan
        reference_grads = grads[:2] + grads[3:]
    native = state_format == "native"
    with _x64(dtype):
        optimizer = AdamPlus(
            learning_rate=LR, group_small_variables=native and (
                layout == "split"), state_format=state_format,
            state_format_min_size=1, **MODES[mode])
        got = _joined(RUNNERS[execution](optimizer, dtype, theta, grads,
                                         layout))
        if BACKEND == "jax" and layout == "split" and native:
            assert optimizer.fast_path.startswith("jax_grouped (2 "), (
                optimizer.fast_path)
    quantized = not native and dtype != "float64"
    if not native:  # every variable quantized but float64 ones
        assert optimizer.describe().count(" 0 of ") == (not quantized), (
            optimizer.describe())
    round_theta = round_state = None
    if dtype not in RTOL:
        round_theta = lambda p: _round(p, dtype)  # noqa: E731
        if "moment_dtype" not in MODES[mode] and not quantized:
            round_state = round_theta
    with _x64(dtype):  # schedules evaluate as they did in the cell
        # Per variable of the layout: each has its own blocks.
        want = np.reshape(np.stack(run_reference(
            _reference_config(mode), _parts(theta, layout),
            [_parts(g, layout) for g in reference_grads],
            round_theta=round_theta, round_state=round_state,
            state_bits=STATE_BITS.get(state_format) if quantized
            else None)), SHAPE)
    np.testing.assert_allclose(got, want, **_tolerance(dtype, want))
    # The coordinates with gradients moved far beyond the tolerance (all
    # but at most one, which may oscillate back); the zero-gradient one
    # moved only by weight decay.
    moved = np.abs(want - theta)
    assert (moved.ravel()[1:] > 0.01).sum() >= 4, moved
    if "weight_decay" not in MODES[mode]:
        assert got[0, 0] == theta[0, 0]
    if mode == "skip_nonfinite" and execution != "stateless":
        with _x64(dtype):
            assert int(ops.convert_to_numpy(optimizer.skipped_steps)) == 1
    if mode == "average" and dtype in RTOL and execution != "stateless":
        _, averages = run_reference_average(
            _reference_config(mode), _parts(theta, layout),
            [_parts(g, layout) for g in grads], 0.9,
            state_bits=STATE_BITS.get(state_format) if quantized else None)
        average = np.reshape(np.stack(averages), SHAPE)
        with _x64(dtype):
            got_average = _joined(optimizer.average_weights())
        np.testing.assert_allclose(got_average, average,
                                   **_tolerance(dtype, average))


def test_matrix_covers_every_pair():
    for a in range(len(COLUMNS)):
        for b in range(a + 1, len(COLUMNS)):
            want = {(x, y) for x in COLUMNS[a] for y in COLUMNS[b]}
            assert {(cell[a], cell[b]) for cell in CELLS} == want
    assert len(CELLS) < len(MODES) * len(DTYPES) * len(EXECUTIONS) / 3
