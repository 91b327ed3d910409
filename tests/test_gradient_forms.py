"""Every form a gradient arrives in x every path of the step, vs float64.

A gradient may be a transposed or sliced view, a broadcast (stride-0) view,
channels-last, a NumPy array, another dtype, or of a shape that only
broadcasts to its variable's. `keras_adam_plus.gradients.conform` gives
each the variable's shape once, for every path: the generic `update_step`
(each backend), torch's fused kernel (which reads memory order) and JAX's
groups (which flatten). Each cell runs three steps and compares the
weights with the float64 reference (`tests/reference.py`) given the same
gradients as plain float64 arrays of the variables' shapes.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus
from tests.reference import run_reference

BACKEND = keras.backend.backend()
# name -> (shape, size): small, so that JAX groups all three.
SHAPES = {"kernel": (3, 4), "conv": (2, 3, 2, 2), "bias": (4,)}
FORMS = ("contiguous", "transposed", "broadcast", "sliced", "channels_last",
         "numpy", "float64", "row")
# path -> the optimizer arguments that select it, and the path it reports.
# TensorFlow's "lazy" path takes the gradients as tf.IndexedSlices over
# every row, in a shuffled order (`lazy_sparse=True`).
PATHS = {
    "tensorflow": {"generic": ({}, "generic"),
                   "lazy": ({"lazy_sparse": True}, "generic")},
    "jax": {"generic": ({}, "generic"),
            "grouped": ({"group_small_variables": True}, "jax_grouped")},
    "torch": {"generic": ({"_force_generic": "test"}, "generic"),
              "fused": ({}, "torch_fused")},
}[BACKEND]


def _optimizer(path, **config):
    """An AdamPlus on `path` (private settings set before build)."""
    settings = PATHS[path][0]
    optimizer = AdamPlus(**config, **{k: v for k, v in settings.items()
                                      if not k.startswith("_")})
    for name, value in settings.items():
        if name.startswith("_"):
            setattr(optimizer, name, value)
    return optimizer


def _rows(gradient, shape):
    """`gradient` as tf.IndexedSlices of every row, rows shuffled."""
    import tensorflow as tf

    dense = tf.broadcast_to(tf.convert_to_tensor(gradient), shape)
    order = np.random.default_rng(0).permutation(shape[0])
    return tf.IndexedSlices(tf.gather(dense, order), tf.constant(order),
                            tf.constant(shape))
CONFIG = dict(learning_rate=0.05, amsgrad=True, weight_decay=0.01,
              weight_decay_mode="l2")


def _gradient(form, value):
    """`value` (float64, the variable's shape) in `form`, and its array.

    The array is what the reference is given: the gradient's values at
    the variable's shape.
    """
    value = value.astype("float32")
    if form == "numpy":
        return value, value
    if form == "float64":
        return ops.convert_to_tensor(value.astype("float64")), value
    if form == "row":  # shape (1, ...) broadcast to the variable's
        row = value[:1]
        return ops.convert_to_tensor(row), np.broadcast_to(row, value.shape)
    if BACKEND != "torch":  # no views: the values are what is checked
        if form == "broadcast":
            row = value[:1]
            return (ops.broadcast_to(ops.convert_to_tensor(row), value.shape),
                    np.broadcast_to(row, value.shape))
        return ops.convert_to_tensor(value), value
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(value))
    if form == "transposed":
        return tensor.T.contiguous().T, value  # a non-contiguous view
    if form == "broadcast":
        row = tensor[:1]
        return row.expand(*value.shape), np.broadcast_to(value[:1],
                                                          value.shape)
    if form == "sliced":
        doubled = torch.stack([tensor, tensor * 7], dim=1)
        return doubled.select(1, 0), value  # every other element
    if form == "channels_last" and tensor.ndim == 4:
        return tensor.contiguous(memory_format=torch.channels_last), value
    return tensor, value


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("form", FORMS)
def test_gradient_form_on_path_matches_reference(form, path):
    reported = PATHS[path][1]
    rng = np.random.default_rng(len(form))
    params = [rng.normal(size=s).astype("float32") for s in SHAPES.values()]
    variables = [keras.Variable(p, name=n) for p, n in zip(params, SHAPES)]
    optimizer = _optimizer(path, **CONFIG)
    seen = []
    for _ in range(3):
        pairs = [_gradient(form, rng.normal(size=s)) for s in SHAPES.values()]
        grads = [g for g, _ in pairs]
        if path == "lazy":
            grads = [_rows(g, s) for g, s in zip(grads, SHAPES.values())]
        optimizer.apply(grads, variables)
        seen.append([np.array(a, np.float64) for _, a in pairs])
    assert optimizer.fast_path.startswith(reported)
    expected = run_reference(CONFIG, params, seen)
    for variable, want in zip(variables, expected):
        got = np.asarray(ops.convert_to_numpy(variable), np.float64)
        # float32 round-off in m, amplified where its terms cancel: 1e-4 of
        # a step (lr); a wrong layout is off by a whole step.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (2, 3, 4)])
def test_a_gradient_that_does_not_broadcast_is_refused_on_every_path(
        path, shape):
    variables = [keras.Variable(np.zeros(s, "float32"), name=n)
                 for n, s in SHAPES.items()]
    optimizer = _optimizer(path)
    grads = [ops.ones(s) for s in SHAPES.values()]
    grads[0] = ops.ones(shape)
    with pytest.raises(ValueError) as info:
        optimizer.apply(grads, variables)
    assert str(info.value) == (
        f"The gradient of variable 'kernel' has shape {shape}, which does "
        "not broadcast to the variable's shape (3, 4).")
    # Refused before any write: no step was counted, no weight moved.
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 0
    for variable in variables:
        assert not np.any(ops.convert_to_numpy(variable))


@pytest.mark.skipif(BACKEND != "tensorflow",
                    reason="a plain tf.Variable is TensorFlow's")
def test_a_plain_tf_variable_is_updated_as_keras_adam_updates_it():
    import tensorflow as tf

    ours, theirs = (tf.Variable(np.array([1.0, -2.0], "float32"))
                    for _ in range(2))
    optimizer = AdamPlus(epsilon_mode="hat", epsilon=1e-7)
    adam = keras.optimizers.Adam()
    for g in ([0.5, -1.0], [0.25, 3.0]):
        optimizer.apply([tf.constant(g)], [ours])
        adam.apply([tf.constant(g)], [theirs])
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


@pytest.mark.parametrize("epsilon_mode", ["paper", "hat"])
@pytest.mark.parametrize("epsilon", [1e-37, 1e-38, 1e-45])
def test_an_epsilon_that_underflows_never_gives_nan(epsilon, epsilon_mode):
    # 1e-37 * sqrt(1 - 0.999) is subnormal in float32: XLA and TensorFlow
    # flush it to zero, and a coordinate whose gradient was always zero
    # became 0 / 0. The epsilon added is at least float32's smallest
    # normal; where the gradient is not zero the step is Adam's.
    variable = keras.Variable(np.array([1.0, 2.0], "float32"))
    optimizer = AdamPlus(learning_rate=0.1, epsilon=epsilon,
                         epsilon_mode=epsilon_mode)
    for _ in range(3):
        optimizer.apply([ops.convert_to_tensor(
            np.array([0.0, 0.5], "float32"))], [variable])
    np.testing.assert_allclose(ops.convert_to_numpy(variable),
                               [1.0, 2.0 - 0.3], rtol=1e-5)
