"""Regressions found outside float32 + one CPU device + model.fit.

Each test pins one failure seen on 04af536 (issue 12), with the numbers the
fixed optimizer must give. The conformance matrix (test_conformance.py)
covers the same regimes broadly; these tests are the exact reproductions.
"""


import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, BetaDecay
from tests.reference import run_reference

BACKEND = keras.backend.backend()
HALF = ("bfloat16", "float16")


def _numpy(value):
    value = ops.convert_to_tensor(value)
    if keras.backend.standardize_dtype(value.dtype) in HALF:
        value = ops.cast(value, "float32")
    return np.asarray(ops.convert_to_numpy(value), np.float64)


def _steps(optimizer, variable, grads):
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(g, variable.dtype)],
                        [variable])
    return _numpy(variable)


# ------------------------------------------------- 1. half precision --

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", [
    {}, dict(amsgrad=True), dict(nesterov=True), dict(weight_decay=0.01),
    dict(bias_correction=False), dict(epsilon_mode="hat"),
], ids=str)
def test_half_precision_zero_gradient_stays_finite(dtype, config):
    # Was [1, nan, 1] in bfloat16 (1 - 0.999**t == 0 there) and
    # [0.852, nan, 1.147] in float16 (1e-8 == 0 there); "hat" never moved.
    variable = keras.Variable(np.ones(3), dtype=dtype)
    got = _steps(AdamPlus(0.05, **config), variable,
                 [np.array([0.1, 0.0, -0.1])] * 3)
    assert np.isfinite(got).all(), got
    assert got[1] == 1.0 or "weight_decay" in config
    # Three steps of about lr each (lr * 3 = 0.15; without bias correction
    # the first steps are larger), symmetric around 1.
    assert 1.0 - got[0] > 0.1 and got[2] - 1.0 > 0.1, got
    if "bias_correction" not in config:
        assert 1.0 - got[0] < 0.25 and got[2] - 1.0 < 0.25, got


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_three_steps_equal_float32(dtype):
    float32 = _steps(AdamPlus(0.05), keras.Variable(np.ones(3),
                                                    dtype="float32"),
                     [np.array([0.1, 0.0, -0.1])] * 3)
    np.testing.assert_allclose(float32, [0.85, 1.0, 1.15], atol=1e-6)
    half = _steps(AdamPlus(0.05), keras.Variable(np.ones(3), dtype=dtype),
                  [np.array([0.1, 0.0, -0.1])] * 3)
    # Each of the 3 steps rounds theta to the dtype: within 2 spacings at
    # 1.15 (bf16: 2**-7, f16: 2**-10).
    spacing = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
    np.testing.assert_allclose(half, float32, atol=2 * spacing)


def test_float16_dense_with_a_constant_zero_feature_has_no_nan():
    # Was: every kernel entry NaN after one epoch.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float16")
    x[:, 2] = 0.0
    y = rng.normal(size=(64, 1)).astype("float16")
    model = keras.Sequential([keras.Input((4,), dtype="float16"),
                              keras.layers.Dense(1, dtype="float16")])
    model.compile(optimizer=AdamPlus(1e-2), loss="mse")
    before = model.get_weights()[0].astype(np.float64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kernel = model.get_weights()[0].astype(np.float64)
    assert np.isfinite(kernel).all(), kernel
    assert kernel[2, 0] == before[2, 0]
    assert np.abs(kernel - before).max() > 0.01


# ------------------------------------- 2-4. the torch fused path ------

torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason="the fused fast path is PyTorch's")


@pytest.mark.skipif(BACKEND == "tensorflow",
                    reason="TensorFlow's optimizer has no stateless_apply")
@pytest.mark.parametrize("config", [{}, dict(amsgrad=True),
                                    dict(epsilon_mode="hat",
                                         weight_decay=0.1)], ids=str)
def test_stateless_apply_is_pure_and_equals_apply(config):
    rng = np.random.default_rng(3)
    theta = rng.normal(size=(4, 3)).astype("float32")
    grads = [rng.normal(size=(4, 3)).astype("float32") for _ in range(3)]
    stateful = AdamPlus(0.1, **config)
    variable = keras.Variable(theta)
    want = _steps(stateful, variable, grads)

    optimizer = AdamPlus(0.1, **config)
    variable = keras.Variable(theta)
    optimizer.build([variable])
    trainable = [ops.convert_to_tensor(theta)]
    state = [ops.copy(v.value) for v in optimizer.variables]
    for g in grads:
        inputs = trainable + state
        before = [_numpy(x) for x in inputs]
        trainable, state = optimizer.stateless_apply(
            state, [ops.convert_to_tensor(g)], trainable)
        # Was (torch): the caller's tensors updated in place.
        for x, old in zip(inputs, before):
            np.testing.assert_array_equal(_numpy(x), old)
    np.testing.assert_allclose(_numpy(trainable[0]), want, rtol=1e-6,
                               atol=1e-7)
    # The optimizer's own variables never moved.
    np.testing.assert_array_equal(_numpy(variable), theta)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 0


@pytest.mark.skipif(BACKEND == "tensorflow",
                    reason="TensorFlow's optimizer has no stateless_apply")
def test_stateless_apply_leaves_inputs_unchanged_and_apply_works_after():
    rng = np.random.default_rng(4)
    theta = rng.normal(size=(4, 3)).astype("float32")
    grads = [rng.normal(size=(4, 3)).astype("float32") for _ in range(3)]
    optimizer = AdamPlus(0.1)
    variable = keras.Variable(theta)
    optimizer.build([variable])
    trainable = [ops.convert_to_tensor(theta)]
    state = [ops.copy(v.value) for v in optimizer.variables]
    inputs = [_numpy(x) for x in trainable + state]
    optimizer.stateless_apply(state, [ops.convert_to_tensor(grads[0])],
                              trainable)
    for x, old in zip(trainable + state, inputs):
        np.testing.assert_array_equal(_numpy(x), old)
    # Was (torch): later apply calls never moved the weights again.
    got = _steps(optimizer, variable, grads)
    want = _steps(AdamPlus(0.1), keras.Variable(theta), grads)
    np.testing.assert_array_equal(got, want)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 3


@torch_only
def test_fused_step_reads_nothing_back_to_the_host(monkeypatch):
    import torch

    from keras_adam_plus.backends import torch_fused

    for config in ({}, dict(epsilon_mode="hat", weight_decay=0.1),
                   dict(bias_correction=False, amsgrad=True)):
        optimizer = AdamPlus(0.1, **config)
        assert optimizer.fast_path == "torch_fused"
        variable = keras.Variable(np.ones((3, 2), "float32"))
        optimizer.build([variable])

        def refuse(*args, **kwargs):
            raise AssertionError("host sync in the fused step")

        grads = [torch.full((3, 2), 0.5)]
        with monkeypatch.context() as patch:
            for name in ("item", "__float__", "__int__", "tolist", "cpu",
                         "numpy", "__bool__"):
                patch.setattr(torch.Tensor, name, refuse)
            torch_fused.update(optimizer._new_step(optimizer.learning_rate),
                               grads, [variable])
        assert np.abs(_numpy(variable) - 1.0).min() > 0.01


@torch_only
@pytest.mark.parametrize("config", [{}, dict(amsgrad=True)], ids=str)
def test_torch_jit_compile_trains(config, tmp_path):
    # Was: BackendCompilerFailed ... aten::_fused_adam_.tensor_lr with
    # Meta tensors.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")

    def model():
        keras.utils.set_random_seed(2)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        return m

    compiled = model()
    compiled.compile(optimizer=AdamPlus(0.05, **config), loss="mse",
                     jit_compile=True)
    compiled.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    eager = model()
    eager.compile(optimizer=AdamPlus(0.05, **config), loss="mse")
    eager.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(compiled.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A file saved with jit_compile=True (as one saved on JAX) loads and
    # trains on torch.
    path = str(tmp_path / "m.keras")
    compiled.save(path)
    restored = keras.models.load_model(path)
    restored.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(restored.get_weights()[0]).all()


# ------------------------------------------- 5-6. exact scalars -------

def test_beta_decay_decays_at_one_minus_1e_8():
    # Was 0.9 (1 - 1e-8 is 1 in float32).
    beta = BetaDecay(0.9, 1 - 1e-8)
    got = float(ops.convert_to_numpy(beta(10**6)))
    np.testing.assert_allclose(got, 0.9 * (1 - 1e-8) ** 10**6, rtol=1e-6)
    np.testing.assert_allclose(got, 0.891045, atol=1e-6)


def _x64():
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("config", [{}, dict(epsilon_mode="hat"),
                                    dict(nesterov=True), dict(adamax=True)],
                         ids=str)
def test_float64_follows_the_reference_to_1e_12(config):
    # Was 3.3e-5 off on TensorFlow (0.999 went through float32).
    rng = np.random.default_rng(6)
    theta = rng.normal(size=(5,))
    grads = [[rng.normal(size=(5,))] for _ in range(20)]
    with _x64():
        variable = keras.Variable(theta, dtype="float64")
        optimizer = AdamPlus(0.5, **config)
        for (g,) in grads:
            optimizer.apply([ops.convert_to_tensor(
                np.asarray(g, "float64"))], [variable])
        got = _numpy(variable)
    want = run_reference(dict(config, learning_rate=0.5), [theta], grads)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(want - theta).min() > 0.1


# ---------------------------------------------------- 9. small items --

def test_integer_trainable_variable_is_refused_at_build():
    # Was (JAX): silently set to 0.
    # torch cannot even make an int tensor that requires a gradient.
    variable = keras.Variable(np.array([1, 2, 3], "int32"), dtype="int32",
                              name="counts", trainable=BACKEND != "torch")
    with pytest.raises(ValueError, match=(
        r"AdamPlus updates floating-point variables only\. Received: "
        r"variable 'counts' with dtype=int32"
    )):
        AdamPlus().build([variable])


@pytest.mark.parametrize("identifier", ["adam_plus", "AdamPlus",
                                        "keras_adam_plus>AdamPlus"])
def test_short_names_resolve(identifier):
    optimizer = keras.optimizers.get(identifier)
    assert type(optimizer) is AdamPlus
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=identifier, loss="mse")
    assert type(model.optimizer) is AdamPlus
