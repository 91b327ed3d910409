"""Shared test helpers: run an optimizer over fixed gradients."""

import keras
import numpy as np


def make_problem(seed=0, shapes=((5, 3), (3,)), steps=100, scale=1.0):
    """Returns initial float32 params and `steps` lists of float32 grads."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [
        [(scale * rng.normal(size=s)).astype("float32") for s in shapes]
        for _ in range(steps)
    ]
    return params, grads


def make_variables(params, names=None):
    names = names or [f"w{i}" for i in range(len(params))]
    return [
        keras.Variable(p, name=n, dtype="float32")
        for p, n in zip(params, names)
    ]


def run_optimizer(optimizer, params, grad_steps, names=None):
    """Applies `optimizer` to fresh variables over `grad_steps`.

    Returns the final values as float64 NumPy arrays, and the variables.
    """
    variables = make_variables(params, names)
    for grads in grad_steps:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads],
                        variables)
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float64)
            for v in variables], variables


def to_numpy(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]
