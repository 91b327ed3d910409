"""A storage format is one class (`keras_adam_plus.storage.Format`).

A toy format stores m, v (v_max, u) times 2**10 in float32: exact, so a
run with it must give the weights of the default format bit for bit, and
its slots must hold 1024 times the default's values. It trains on every
backend's paths: the generic step, JAX groups, TensorFlow's sparse rows,
compiled `fit`; torch's fused kernel, which reads the stored values
itself, is refused with the reason.
"""

import pickle

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, rule, storage

BACKEND = keras.backend.backend()
SCALE = 1024.0


class Scaled(storage.Format):
    """m, v stored times 2**10 in float32 (exact: a power of two)."""

    name = "scaled"
    native = False

    def slot_dtype(self, variable, moment_dtype):
        return "float32"

    def decode(self, stored, dtype):
        return ops.divide(ops.cast(stored, dtype),
                          rule.constant(SCALE, dtype))

    def encode(self, value, slot_dtype):
        return ops.cast(ops.multiply(value, rule.constant(SCALE, "float32")),
                        slot_dtype)


MODES = {"adam": {}, "amsgrad_l2": dict(amsgrad=True, weight_decay=0.1,
                                        weight_decay_mode="l2"),
         "adamax_decoupled": dict(adamax=True, weight_decay=0.05)}


def _optimizer(fmt, **config):
    # On JAX through flat groups: the format must hold on that path too.
    optimizer = AdamPlus(learning_rate=0.01,
                         group_small_variables=BACKEND == "jax", **config)
    optimizer._state_format = fmt
    if BACKEND == "torch":  # the toy format runs the generic path there
        optimizer._force_generic = "compared with the toy format"
    return optimizer


def _slots(optimizer):
    """The moment slots' stored values, in the optimizer's order."""
    return [np.asarray(ops.convert_to_numpy(v))
            for v in optimizer.variables if v.path.endswith(
                ("momentum", "velocity", "velocity_max"))]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("execution", ["apply", "fit"])
def test_a_toy_format_trains_as_the_default(mode, execution):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    runs = {}
    for fmt in (storage.NATIVE, Scaled()):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                                  keras.layers.Dense(2)])
        optimizer = _optimizer(fmt, **MODES[mode])
        if execution == "fit":
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        else:
            grad_rng = np.random.default_rng(2)
            for _ in range(5):
                grads = [ops.convert_to_tensor(grad_rng.normal(size=v.shape)
                                               .astype("float32"))
                         for v in model.trainable_variables]
                optimizer.apply(grads, model.trainable_variables)
        runs[fmt.name] = (model.get_weights(), _slots(optimizer),
                          optimizer.fast_path)
    (weights, slots, _), (toy_weights, toy_slots, path) = (
        runs["native"], runs["scaled"])
    for a, b in zip(toy_weights, weights):
        np.testing.assert_array_equal(a, b)
    assert len(toy_slots) == len(slots) and slots
    for toy, value in zip(toy_slots, slots):
        np.testing.assert_array_equal(toy, value * SCALE)
        assert np.any(value)
    if BACKEND == "jax":
        assert path.startswith("jax_grouped")


@pytest.mark.skipif(BACKEND != "torch", reason="torch's fused kernel")
def test_the_fused_kernel_refuses_a_stored_format():
    optimizer = AdamPlus()
    optimizer._state_format = Scaled()
    assert optimizer.fast_path == (
        "generic (state format 'scaled': the fused kernel reads and writes "
        "m, v as they are stored)")


@pytest.mark.skipif(BACKEND != "tensorflow",
                    reason="sparse rows are TensorFlow's (lazy_sparse)")
def test_a_toy_format_on_tensorflows_sparse_rows():
    import tensorflow as tf

    tables = {}
    for fmt in (storage.NATIVE, Scaled()):
        table = keras.Variable(np.ones((6, 3), "float32"), name="table")
        optimizer = _optimizer(fmt, lazy_sparse=True, amsgrad=True)
        for step in range(3):
            grad = tf.IndexedSlices(
                tf.constant(np.full((2, 3), step + 1.0, "float32")),
                tf.constant([step, 4]), tf.constant([6, 3]))
            optimizer.apply([grad], [table])
        tables[fmt.name] = (table.numpy(), _slots(optimizer))
    np.testing.assert_array_equal(tables["scaled"][0], tables["native"][0])
    # Lazy: row 5 was never touched, row 4 was at every step.
    np.testing.assert_array_equal(tables["native"][0][5], np.ones(3))
    assert np.all(tables["native"][0][4] < 1)
    for toy, value in zip(tables["scaled"][1], tables["native"][1]):
        np.testing.assert_array_equal(toy, value * SCALE)


def test_a_saved_format_loads_only_into_that_format(tmp_path):
    # The format is saved beside the state (none is written for the
    # default, so older files load as "native"); loading a state into an
    # optimizer of another format is refused before anything is written.
    variable = keras.Variable(np.ones((3,), "float32"), name="w")
    saved = _optimizer(Scaled())
    saved.apply([ops.ones((3,))], [variable])
    store = {}
    saved.save_own_variables(store)
    assert storage.FORMAT_KEY in store
    same = _optimizer(Scaled())
    same.build([variable])
    same.load_own_variables(store)
    for a, b in zip(_slots(same), _slots(saved)):
        np.testing.assert_array_equal(a, b)
    for built in (True, False):
        other = _optimizer(storage.NATIVE)
        if built:
            other.build([variable])
        before = [np.array(ops.convert_to_numpy(v)) for v in other.variables]
        with pytest.raises(ValueError, match="saved in state format "
                           "'scaled', this optimizer keeps 'native'"):
            other.load_own_variables(store)
        for a, v in zip(before, other.variables):
            np.testing.assert_array_equal(a, ops.convert_to_numpy(v))
    native = {}
    other.save_own_variables(native)
    assert storage.FORMAT_KEY not in native
    with pytest.raises(ValueError, match="saved in state format 'native', "
                       "this optimizer keeps 'scaled'"):
        _optimizer(Scaled()).load_own_variables(native)


def test_weights_and_pickle_never_carry_stored_values_as_others():
    # get_weights/set_weights exchange the state's values (decoded), so a
    # state moves between formats; pickle keeps the stored values and is
    # refused by an optimizer of another format. (Found by review: both
    # routes put 1024 times the moments into a native optimizer.)
    variable = keras.Variable(np.ones((3,), "float32"), name="w")
    source = _optimizer(Scaled())
    source.apply([ops.ones((3,))], [variable])
    native = _optimizer(storage.NATIVE)
    native.build([variable])
    native.set_weights(source.get_weights())
    for got, stored in zip(_slots(native), _slots(source)):
        np.testing.assert_array_equal(got * SCALE, stored)
    np.testing.assert_allclose(_slots(native)[0], 0.1, rtol=1e-6)
    back = _optimizer(Scaled())
    back.build([variable])
    back.set_weights(native.get_weights())
    for got, stored in zip(_slots(back), _slots(source)):
        np.testing.assert_array_equal(got, stored)
    with pytest.raises(ValueError, match="saved in state format 'scaled', "
                       "this optimizer keeps 'native'"):
        pickle.loads(pickle.dumps(source))
