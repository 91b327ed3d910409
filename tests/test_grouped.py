"""Flat slots for groups of small variables (backends/jax_grouped.py).

On JAX with `group_small_variables=True`, variables of at most
`jax_grouped.MAX_SIZE` elements with the same dtype and weight decay share
one flat slot per kind. Every test here runs the same steps with groups and
without (the default: one slot per variable, the path of every other
backend) and compares: weights and
state to round-off, saved files identical, files loading both ways.
"""

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, BetaDecay, storage
from keras_adam_plus.backends import jax_grouped

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="only the JAX backend groups variables into flat slots (XLA's "
    "per-kernel cost); TensorFlow and torch keep a slot per variable",
)

# Small float32 and bfloat16 variables, between them one too large for a
# group (12000 elements); "bias" names are excluded from weight decay in
# one mode, which splits the float32 group and leaves each bfloat16
# variable alone.
VARIABLES = [
    ("dense_kernel", (4, 3), "float32"),
    ("dense_bias", (3,), "float32"),
    ("half_kernel", (5,), "bfloat16"),
    ("big_kernel", (40, 300), "float32"),
    ("out_kernel", (2, 2), "float32"),
    ("out_bias", (7,), "float32"),
    ("half_bias", (6,), "bfloat16"),
]
MODES = {
    "adam": {},
    "amsgrad_l2": dict(amsgrad=True, weight_decay=0.1,
                       weight_decay_mode="l2"),
    "decoupled_exclude": dict(weight_decay=0.1,
                              weight_decay_exclude=["bias"]),
    "nesterov": dict(nesterov=True),
    "adamax": dict(adamax=True),
    "hat_no_bias_correction": dict(epsilon_mode="hat",
                                   bias_correction=False),
    "scheduled_betas": dict(beta_1=BetaDecay(0.9, 0.9)),
    "moment_dtype": dict(moment_dtype="float32"),
    "average": dict(average_decay=0.9),
    "skip_nonfinite": dict(skip_nonfinite=True),
}
STEPS = 5


def _problem():
    rng = np.random.default_rng(3)
    theta = [rng.normal(size=shape) for _, shape, _ in VARIABLES]
    grads = [[rng.normal(size=shape) for _, shape, _ in VARIABLES]
             for _ in range(STEPS)]
    grads[2][1][0] = np.nan  # skipped under skip_nonfinite
    return theta, grads


def _variables(theta):
    return [keras.Variable(value, dtype=dtype, name=name)
            for value, (name, _, dtype) in zip(theta, VARIABLES)]


def _optimizer(config, grouped):
    return AdamPlus(learning_rate=0.01, group_small_variables=grouped,
                    **config)


def _numpy(values):
    return [np.asarray(ops.convert_to_numpy(ops.cast(v, "float32")),
                       np.float64) for v in values]


def _half(value):
    dtype = keras.backend.standardize_dtype(value.dtype)
    return dtype in ("bfloat16", "float16")


def _run(config, grouped, execution):
    theta, grads = _problem()
    if "skip_nonfinite" not in config:
        grads = grads[:2] + grads[3:]
    variables = _variables(theta)
    optimizer = _optimizer(config, grouped)
    optimizer.build(variables)
    if execution == "apply":
        for step in grads:
            optimizer.apply([ops.convert_to_tensor(g, v.dtype)
                             for g, v in zip(step, variables)], variables)
        return [v.value for v in variables], optimizer
    import jax

    apply = jax.jit(optimizer.stateless_apply)
    trainable = [v.value for v in variables]
    state = [v.value for v in optimizer.variables]
    for step in grads:
        trainable, state = apply(
            state, [ops.convert_to_tensor(g, v.dtype)
                    for g, v in zip(step, variables)], trainable)
    for variable, value in zip(optimizer.variables, state):
        variable.assign(value)
    return trainable, optimizer


def _close(got, want):
    """Equal to round-off: float32 of a few steps, or one bfloat16 step."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        rtol = 2 ** -7 if _half(b) else 1e-6
        (x,), (y,) = _numpy([a]), _numpy([b])
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("execution", ["apply", "stateless"])
@pytest.mark.parametrize("mode", list(MODES))
def test_groups_give_the_per_variable_numbers(mode, execution):
    config = MODES[mode]
    grouped, opt = _run(config, True, execution)
    plain, plain_opt = _run(config, False, execution)
    # Four float32 and two bfloat16 variables; with "bias" excluded from
    # the decay, two float32 pairs (the bfloat16 ones are then alone).
    count = 4 if "weight_decay_exclude" in config else 6
    assert opt.fast_path == (f"jax_grouped ({count} variables in 2 "
                             "groups, the rest per variable)")
    assert plain_opt.fast_path == "generic"
    assert len(opt.variables) < len(plain_opt.variables)
    _close(grouped, plain)
    values, kinds, _ = storage.snapshot(opt._face())
    plain_values, plain_kinds, _ = storage.snapshot(plain_opt._face())
    assert kinds == plain_kinds
    for a, b in zip(values, plain_values):
        assert a.shape == b.shape and a.dtype == b.dtype
    _close(values, plain_values)
    if mode == "average" and execution == "apply":
        _close(opt.average_weights(), plain_opt.average_weights())
    if mode == "skip_nonfinite" and execution == "apply":
        assert int(opt.skipped_steps.numpy()) == 1


def test_groups_follow_dtype_decay_size_and_keras_flags():
    sizes = [int(np.prod(shape)) for _, shape, _ in VARIABLES]
    assert max(sizes) > jax_grouped.MAX_SIZE >= sorted(sizes)[-2]
    theta, _ = _problem()
    variables = _variables(theta)
    variables[4].overwrite_with_gradient = True
    optimizer = AdamPlus(weight_decay=0.1, weight_decay_exclude=["bias"],
                         group_small_variables=True)
    optimizer.build(variables)
    # Decayed: dense_kernel (out_kernel is overwritten with its gradient,
    # big_kernel too large) and half_kernel, each alone; not decayed:
    # dense_bias and out_bias, a group; half_bias alone (bfloat16).
    assert optimizer._plan.groups == ((1, 5),)
    assert optimizer._store.m[4] is None

    class OwnStep(AdamPlus):
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)

    own = OwnStep(group_small_variables=True)
    own.build(_variables(theta))
    assert own._plan.groups == ()
    assert own.fast_path == "generic (OwnStep overrides update_step)"


def test_no_groups_under_a_distribution():
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices))
    try:
        optimizer = AdamPlus(group_small_variables=True)
        optimizer.build(_variables(_problem()[0]))
    finally:
        keras.distribution.set_distribution(None)
    assert optimizer._plan.groups == ()


def test_a_step_on_part_of_a_group_updates_only_that_part():
    theta, grads = _problem()
    results = []
    for grouped in (True, False):
        variables = _variables(theta)
        optimizer = _optimizer({"amsgrad": True}, grouped)
        optimizer.build(variables)
        # dense_bias and out_bias share a group: step one of them only.
        part = [variables[i] for i in (0, 1, 3)]
        for step in grads[:2]:
            optimizer.apply([ops.convert_to_tensor(step[i], "float32")
                             for i in (0, 1, 3)], part)
        results.append(([v.value for v in variables],
                        storage.snapshot(optimizer._face())[0]))
    (grouped, state), (plain, plain_state) = results
    _close(grouped, plain)
    _close(state, plain_state)
    np.testing.assert_array_equal(_numpy(grouped[5:6])[0],
                                  _numpy([theta[5].astype("float32")])[0])


def _model(grouped):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8),
        keras.layers.BatchNormalization(), keras.layers.Dense(3),
    ])
    model.compile(optimizer=_optimizer({"amsgrad": True}, grouped),
                  loss="mse")
    return model


def _fit(model, seed=0):
    rng = np.random.default_rng(seed)
    model.fit(rng.normal(size=(32, 6)), rng.normal(size=(32, 3)),
              batch_size=8, epochs=1, shuffle=False, verbose=0)


def _h5_optimizer_arrays(path):
    arrays = {}
    with h5py.File(path) as f:
        f["optimizer"].visititems(
            lambda name, x: arrays.__setitem__(name, x[()])
            if isinstance(x, h5py.Dataset) else None)
    return arrays


@pytest.mark.parametrize("saved_grouped, load_built", [
    (True, True), (False, False)])
def test_files_do_not_depend_on_grouping(tmp_path, saved_grouped,
                                         load_built):
    saved = _model(saved_grouped)
    other = _model(not saved_grouped)
    _fit(saved)
    _fit(other)
    assert bool(saved.optimizer._plan.groups) == saved_grouped
    # The same state saves to the same arrays, under the same keys.
    a, b = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    saved.save_weights(a)
    other.save_weights(b)
    arrays, other_arrays = _h5_optimizer_arrays(a), _h5_optimizer_arrays(b)
    assert arrays.keys() == other_arrays.keys()
    for key in arrays:
        np.testing.assert_allclose(arrays[key], other_arrays[key],
                                   rtol=1e-6, atol=1e-7)
    # A .keras file loads into the other layout and trains on as before.
    path = tmp_path / "m.keras"
    saved.save(path)
    at_save = storage.snapshot(saved.optimizer._face())[0]
    loaded = _model(not saved_grouped)
    if load_built:
        loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)  # unbuilt: pending, assigned at build
    loaded.optimizer.build(loaded.trainable_variables)
    assert loaded.optimizer._pending_state is None
    assert bool(loaded.optimizer._plan.groups) != saved_grouped
    for x, y in zip(storage.snapshot(loaded.optimizer._face())[0], at_save):
        np.testing.assert_array_equal(x, y)
    _fit(saved, seed=1)
    _fit(loaded, seed=1)
    _close(loaded.weights, saved.weights)
    # load_model builds the saved configuration's layout.
    restored = keras.models.load_model(path)
    restored.optimizer.build(restored.trainable_variables)
    assert bool(restored.optimizer._plan.groups) == saved_grouped
    for x, y in zip(storage.snapshot(restored.optimizer._face())[0], at_save):
        np.testing.assert_array_equal(x, y)
