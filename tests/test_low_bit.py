"""`state_format="8bit"`: block-wise 8-bit m, v (v_max, u).

Checked against the independent float64 quantizer of `tests/reference.py`
to the code's own rounding: from the package's stored codes and scales, a
float64 Adam step then the reference's quantization gives the package's
next codes, except where float32 and float64 land on opposite sides of a
midpoint between two codes (counted: a handful in tens of thousands).
Then the threshold, the memory, saving and resuming bit-exactly, the
refusals, the skip of non-finite steps, every execution, and a short
training run against float32 state.
"""

import pickle

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, lowbit
from tests.reference import (
    ReferenceAdam,
    reference_dequantize,
    reference_dynamic_map,
    reference_quantize,
)

BACKEND = keras.backend.backend()
SHAPE = (40, 130)  # 5200 elements: 20 blocks of 256 and one of 80
# torch.compile takes ~30 s a model on 2 cores: behind --runslow there.
TORCH_JIT = pytest.mark.slow if BACKEND == "torch" else ()


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _state(optimizer):
    """Every optimizer variable's value, by path."""
    return {v.path: _numpy(v) for v in optimizer.variables}


def test_the_maps_are_the_references_rounded_to_float32():
    for signed in (True, False):
        want = reference_dynamic_map(signed)
        np.testing.assert_array_equal(lowbit.TABLES[signed],
                                      want.astype(np.float32))
        assert want[-1] == 1.0 and 0.0 in want
        assert (want.min() < -0.99) if signed else want.min() == 0.0


def test_encoding_is_the_references_quantization():
    rng = np.random.default_rng(0)
    values = (rng.standard_t(3, size=SHAPE) * 1e-3).astype("float32")
    values[3] = 0.0  # zeros (a whole block below) and a partial last block
    values[:2] = 0.0
    for signed in (True, False):
        x = values if signed else np.abs(values)
        codes, scales = lowbit.encode(ops.convert_to_tensor(x), signed)
        want_codes, want_scales = reference_quantize(x, signed)
        assert _numpy(codes).dtype == np.uint8
        assert _numpy(scales).shape == (21,)
        np.testing.assert_array_equal(_numpy(scales), want_scales)
        differ = _numpy(codes).astype(int) != want_codes
        assert differ.sum() <= 2, differ.sum()
        assert np.all(np.abs(_numpy(codes).astype(int) - want_codes) <= 1)
        # The float32 map's entries are the reference's to 6e-8.
        np.testing.assert_allclose(
            _numpy(lowbit.decode(codes, scales, "float32", signed)),
            reference_dequantize(_numpy(codes), _numpy(scales), signed),
            rtol=2e-7, atol=0)


MODES = {
    "adam": {},
    "amsgrad_l2": dict(amsgrad=True, weight_decay=0.1,
                       weight_decay_mode="l2"),
    "adamax_decoupled": dict(adamax=True, weight_decay=0.05),
    "nesterov_hat": dict(nesterov=True, epsilon_mode="hat",
                         weight_decay=0.01,
                         weight_decay_mode="decoupled_unscaled"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_step_is_the_references_step_requantized(mode):
    # Lockstep: every step starts the float64 reference from the
    # package's stored state (dequantized by the reference) and theta.
    config = MODES[mode]
    rng = np.random.default_rng(1)
    theta = keras.Variable(rng.normal(size=SHAPE).astype("float32"),
                           name="theta")
    optimizer = AdamPlus(learning_rate=0.01, state_format="8bit", **config)
    optimizer.build([theta])
    reference = ReferenceAdam(**config)
    kinds = ["momentum", "velocity"] + (
        ["velocity_max"] if config.get("amsgrad") else [])
    flips = 0
    for step in range(4):
        grad = (rng.normal(size=SHAPE) * 10.0 ** rng.integers(
            -6, 0, size=SHAPE)).astype("float32")
        grad[0] = 0.0  # coordinates that never see a gradient
        before = _state(optimizer)
        stored = {k: reference_dequantize(
            before[f"adam_plus/theta_{k}"],
            before[f"adam_plus/theta_{k}_scale"], k == "momentum")
            for k in kinds}
        before_theta = _numpy(theta).astype(np.float64)
        params = [before_theta.copy()]
        if step:
            reference.m, reference.v = [stored["momentum"]], [
                stored["velocity"]]
            reference.v_max = [stored.get("velocity_max",
                                          stored["velocity"])]
        reference.step(params, [grad], 0.01)
        optimizer.apply([ops.convert_to_tensor(grad)], [theta])
        after = _state(optimizer)
        # Decrements: where v's code is 0 and m's is not (a value under
        # 1e-7 of its block's absmax) the step is m / epsilon, large and
        # as sensitive to float32 as any.
        # theta is float32: to 1e-3 of the decrement (a code's error is
        # 1e-2) plus two of its ulps (Nesterov's numerator may cancel).
        got_theta = _numpy(theta)
        decrement = before_theta - params[0]
        error = np.abs(got_theta - params[0])
        allowed = 1e-3 * np.abs(decrement) + 2 * np.spacing(
            np.abs(got_theta))
        assert np.all(error <= allowed), (error / allowed).max()
        assert np.any(decrement)
        for kind, value in (("momentum", reference.m[0]),
                            ("velocity", reference.v[0]),
                            ("velocity_max", reference.v_max[0])):
            if kind not in kinds:
                continue
            codes, scales = reference_quantize(value, kind == "momentum")
            got = after[f"adam_plus/theta_{kind}"].astype(int)
            np.testing.assert_allclose(
                after[f"adam_plus/theta_{kind}_scale"], scales, rtol=1e-6)
            assert np.all(np.abs(got - codes) <= 1), kind
            flips += int(np.sum(got != codes))
    assert flips <= 20, flips  # of 4 steps x 5200 x 2 or 3 codes


def test_the_threshold_is_per_variable():
    small = keras.Variable(np.ones((4095,), "float32"), name="small")
    large = keras.Variable(np.ones((4096,), "float32"), name="large")
    optimizer = AdamPlus(state_format="8bit")
    optimizer.build([small, large])
    dtypes = {v.name: keras.backend.standardize_dtype(v.dtype)
              for v in optimizer.variables}
    assert dtypes["small_momentum"] == "float32"
    assert dtypes["large_momentum"] == dtypes["large_velocity"] == "uint8"
    assert "small_momentum_scale" not in dtypes
    assert tuple(optimizer.variables[-1].shape) == (16,)
    assert "1 of 2 variables quantized, the others keep the native " \
        "format (1 under 4096 elements)" in optimizer.describe()
    every = AdamPlus(state_format="8bit", state_format_min_size=0)
    every.build([small])
    assert keras.backend.standardize_dtype(
        every.variables[2].dtype) == "uint8"
    # float64 weights keep float64 state, whatever their size.
    with _x64():
        wide = keras.Variable(np.ones((4096,), "float64"), dtype="float64",
                              name="wide")
        kept = AdamPlus(state_format="8bit")
        kept.build([wide])
        assert [keras.backend.standardize_dtype(v.dtype)
                for v in kept.variables[2:]] == ["float64", "float64"]
        assert "(1 float64)" in kept.describe()


def _x64():
    """JAX holds float64 only inside `enable_x64`."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    import contextlib

    return contextlib.nullcontext()


def test_state_bytes_per_parameter():
    def ratio(state_format):
        model = keras.Sequential([keras.Input((512,)),
                                  keras.layers.Dense(512),
                                  keras.layers.Dense(512)])
        optimizer = AdamPlus(state_format=state_format)
        optimizer.build(model.trainable_variables)
        state = sum(_numpy(v).nbytes for v in optimizer.variables)
        return state / model.count_params()

    assert ratio("8bit") <= 2.1
    assert 8.0 <= ratio("native") <= 8.01


def _model(optimizer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(80, name="hidden"),
                              keras.layers.Dense(3, name="out")], name="net")
    model.compile(optimizer=optimizer, loss="mse")
    return model


X = np.random.default_rng(0).normal(size=(16, 64)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")


def _train(model, first, last):
    """Eager steps `first` to `last` - 1 on fixed gradients."""
    variables = model.trainable_variables
    for step in range(first, last):
        rng = np.random.default_rng(step)
        model.optimizer.apply(
            [ops.convert_to_tensor(rng.normal(size=v.shape).astype(
                "float32") * 1e-2) for v in variables], variables)


@pytest.mark.parametrize("route", ["keras_file", "weights_h5", "pickle",
                                   "set_weights", "state_tree"])
def test_a_resumed_run_continues_bit_exactly(route, tmp_path):
    def optimizer():
        return AdamPlus(learning_rate=0.01, state_format="8bit",
                        amsgrad=True)

    straight = _model(optimizer())
    _train(straight, 0, 4)
    source = _model(optimizer())
    _train(source, 0, 2)
    if route == "keras_file":
        source.save(tmp_path / "m.keras")
        target = keras.models.load_model(tmp_path / "m.keras")
    elif route == "pickle":
        target = _model(pickle.loads(pickle.dumps(source.optimizer)))
        target.set_weights(source.get_weights())
    else:
        target = _model(optimizer())
        target.optimizer.build(target.trainable_variables)
        if route == "weights_h5":
            source.save_weights(tmp_path / "m.weights.h5")
            target.load_weights(tmp_path / "m.weights.h5")
        elif route == "state_tree":
            target.set_state_tree(source.get_state_tree())
        else:
            target.set_weights(source.get_weights())
            target.optimizer.set_weights(source.optimizer.get_weights())
    assert target.optimizer.state_format == "8bit"
    _train(target, 2, 4)
    for got, want in zip(target.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(got, want)
    got = list(_state(target.optimizer).values())
    want = list(_state(straight.optimizer).values())
    assert any(v.dtype == np.uint8 for v in want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


MODE_ROWS = {
    "average_and_ema": dict(average_decay=0.9, use_ema=True),
    "groups_scheduled_decay": dict(
        variable_groups=[{"match": "out", "learning_rate_multiplier": 0.5}],
        weight_decay=lambda step: 0.01),
    "bfloat16_weights": dict(moment_dtype="float32"),
}


@pytest.mark.parametrize("row", list(MODE_ROWS))
def test_other_modes_take_the_steps_of_float32_state(row):
    # 8-bit moments move the steps by about a code's error (1e-2).
    changes = {}
    for state_format in ("native", "8bit"):
        keras.utils.set_random_seed(3)
        dtype = "bfloat16" if row.startswith("bfloat16") else "float32"
        model = keras.Sequential([
            keras.Input((64,)), keras.layers.Dense(80, dtype=dtype),
            keras.layers.Dense(3, name="out", dtype=dtype)])
        model.optimizer = AdamPlus(learning_rate=0.01,
                                   state_format=state_format,
                                   **MODE_ROWS[row])
        start = [_numpy(v).astype("float32")
                 for v in model.trainable_variables]
        _train(model, 0, 3)
        changes[state_format] = [_numpy(v).astype("float32") - s for v, s in
                                 zip(model.trainable_variables, start)]
        if state_format == "8bit":
            kinds = [keras.backend.standardize_dtype(v.dtype)
                     for v in model.optimizer.variables]
            assert "uint8" in kinds
    for a, b in zip(changes["8bit"], changes["native"]):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0.1,
                                   atol=0.1 * np.abs(b).max())


def test_another_format_is_refused_or_converted(tmp_path):
    model = _model(AdamPlus(state_format="8bit"))
    model.fit(X, Y, batch_size=4, verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    native = _model(AdamPlus())
    native.optimizer.build(native.trainable_variables)
    with pytest.raises(ValueError, match="Cannot load the state of "
                       "optimizer 'adam_plus': it was saved in state format "
                       "'8bit', this optimizer keeps 'native'"):
        native.load_weights(tmp_path / "m.weights.h5")
    # Another threshold: other slots keep scales.
    lower = _model(AdamPlus(state_format="8bit", state_format_min_size=100))
    lower.optimizer.build(lower.trainable_variables)
    with pytest.raises(ValueError, match="Cannot load the state of "
                       "optimizer 'adam_plus': the saved state has 12 values"
                       ".* momentum_scale x1, velocity_scale x1, this "
                       "optimizer has 14 "):
        lower.load_weights(tmp_path / "m.weights.h5")
    # A float value never lands in a slot of codes, nor codes in floats.
    weights = model.optimizer.get_weights()
    assert weights[2].dtype == np.uint8
    for i, dtype in ((2, "float32"), (3, "uint8")):
        wrong = list(weights)
        wrong[i] = wrong[i].astype(dtype)
        with pytest.raises(ValueError, match=(
                "Cannot load the state of optimizer 'adam_plus': variable "
                r"adam_plus/net_\w+ keeps \w+ values, the saved value is "
                f"{dtype} ")):
            model.optimizer.set_weights(wrong)
    for a, b in zip(model.optimizer.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    # A native state converts by set_weights: quantized once.
    native.fit(X, Y, batch_size=4, verbose=0)
    model.optimizer.set_weights(native.optimizer.get_weights())
    state = _state(model.optimizer)
    m = native.optimizer.variables[2]
    codes, scales = reference_quantize(_numpy(m), True)
    stored = state["adam_plus/net_hidden_kernel_momentum"].astype(int)
    assert np.sum(stored != codes) <= 2
    np.testing.assert_allclose(
        state["adam_plus/net_hidden_kernel_momentum_scale"], scales,
        rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=TORCH_JIT)])
def test_a_skipped_step_leaves_codes_and_scales(jit_compile):
    model = _model(AdamPlus(state_format="8bit", skip_nonfinite=True,
                            amsgrad=True))
    model.compile(optimizer=model.optimizer, loss="mse",
                  jit_compile=jit_compile)
    model.fit(X[:4], Y[:4], batch_size=4, verbose=0)
    before = _state(model.optimizer)
    bad = X[:4].copy()
    bad[0, 0] = np.nan
    model.fit(bad, Y[:4], batch_size=4, verbose=0)
    after = _state(model.optimizer)
    assert int(model.optimizer.skipped_steps) == 1
    for path, value in before.items():
        if not path.endswith("skipped_steps"):
            np.testing.assert_array_equal(after[path], value, path)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="Keras has no "
                    "stateless_apply on TensorFlow")
def test_a_skipped_stateless_step_returns_codes_and_scales():
    theta = keras.Variable(np.ones(SHAPE, "float32"), name="theta")
    optimizer = AdamPlus(state_format="8bit", skip_nonfinite=True)
    optimizer.build([theta])
    state = [v.value for v in optimizer.variables]
    good = ops.convert_to_tensor(np.full(SHAPE, 0.5, "float32"))
    values, state = optimizer.stateless_apply(state, [good], [theta.value])
    bad = np.full(SHAPE, 0.5, "float32")
    bad[1, 2] = np.inf
    after, new_state = optimizer.stateless_apply(
        state, [ops.convert_to_tensor(bad)], values)
    for variable, old, new in zip(optimizer.variables, state, new_state):
        if variable is not optimizer.skipped_steps:
            np.testing.assert_array_equal(_numpy(new), _numpy(old))
    assert any(_numpy(x).dtype == np.uint8 and _numpy(x).any()
               for x in new_state)
    np.testing.assert_array_equal(_numpy(after[0]), _numpy(values[0]))


EXECUTIONS = ["apply", "fit", pytest.param("fit_jit", marks=TORCH_JIT),
              pytest.param("stateless_apply", marks=pytest.mark.skipif(
                  BACKEND == "tensorflow", reason="Keras has no "
                  "stateless_apply on TensorFlow")),
              "loss_scale", "accumulate"]


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_every_execution_takes_the_same_steps(execution):
    # Each execution's 4 steps against eager `apply`'s: the same codes but
    # where float32 round-off of another fusion crosses a midpoint.
    def run(execution):
        config = dict(learning_rate=0.01, state_format="8bit",
                      nesterov=True, beta_1=lambda t: 0.9)
        if execution == "accumulate":
            config["gradient_accumulation_steps"] = 2
        optimizer = AdamPlus(**config)
        if execution == "loss_scale":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model = _model(optimizer)
        variables = model.trainable_variables
        rng = np.random.default_rng(5)
        grads = [[rng.normal(size=v.shape).astype("float32") * 1e-2
                  for v in variables] for _ in range(4)]
        if execution == "accumulate":  # two equal micro-batches a step
            grads = [g for g in grads for _ in range(2)]
        if execution.startswith("fit") or execution == "loss_scale":
            model.compile(optimizer=optimizer, loss="mse",
                          jit_compile=execution == "fit_jit")
            model.fit(X[:16], Y[:16], batch_size=4, shuffle=False,
                      verbose=0)
            return model, None
        if execution == "stateless_apply":
            optimizer.build(variables)
            state = [v.value for v in optimizer.variables]
            values = [v.value for v in variables]
            for g in grads:
                values, state = optimizer.stateless_apply(
                    state, [ops.convert_to_tensor(x) for x in g], values)
            for v, value in zip(optimizer.variables, state):
                v.assign(value)
            for v, value in zip(variables, values):
                v.assign(value)
            return model, grads
        for g in grads:
            optimizer.apply([ops.convert_to_tensor(x) for x in g], variables)
        return model, grads

    model = run(execution)[0]
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert int(inner.iterations) == 4
    if execution in ("fit_jit", "loss_scale"):
        # Against the same fit without jit: the path, not the data.
        reference = run("fit")[0]
    elif execution == "fit":
        reference = model
    else:
        reference = run("apply")[0]
    # In order: TensorFlow names an inner optimizer's slots by where it
    # was built.
    want, got = ([v for p, v in _state(o).items()
                  if "accumulator" not in p]
                 for o in (reference.optimizer, inner))
    codes = [i for i, w in enumerate(want) if w.dtype == np.uint8]
    assert codes and len(got) == len(want)
    for i in codes:
        assert np.sum(got[i] != want[i]) <= 4, i
        assert np.all(np.abs(got[i].astype(int) - want[i]) <= 1)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_arguments_are_checked_and_configured():
    with pytest.raises(ValueError, match=r"^Argument `state_format` must be "
                       r"one of \"native\", \"8bit\". Received: "
                       r"state_format='4bit'$"):
        AdamPlus(state_format="4bit")
    with pytest.raises(ValueError, match=r"^Argument `state_format_min_size`"
                       r" must be an integer >= 0. Received: "
                       r"state_format_min_size=-1$"):
        AdamPlus(state_format_min_size=-1)
    for flag in ("lazy_sparse", "group_small_variables"):
        with pytest.raises(ValueError, match=(
                rf"^Argument `state_format` '8bit' cannot combine with "
                rf"`{flag}=True` yet \(.*\)\. Received: "
                rf"state_format='8bit', {flag}=True$")):
            AdamPlus(state_format="8bit", **{flag: True})
    optimizer = AdamPlus(state_format="8bit", state_format_min_size=10)
    config = optimizer.get_config()
    assert config["state_format"] == "8bit"
    assert config["state_format_min_size"] == 10
    again = AdamPlus.from_config(config)
    assert (again.state_format, again.state_format_min_size) == ("8bit", 10)
    old = {k: v for k, v in config.items() if not k.startswith("state_")}
    assert AdamPlus.from_config(old).state_format == "native"
    assert "state format '8bit'" in optimizer.fast_path
    assert AdamPlus(state_format_min_size=np.int64(5)) \
        .state_format_min_size == 5


def test_digits_train_as_with_float32_state():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    losses = {}
    for state_format in ("native", "8bit"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)),
                                  keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer=AdamPlus(learning_rate=1e-2,
                                         state_format=state_format),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        history = model.fit(x, y, batch_size=128, epochs=4, shuffle=False,
                            verbose=0)
        losses[state_format] = history.history["loss"][-1]
    assert losses["native"] < 0.3
    assert abs(losses["8bit"] - losses["native"]) <= 0.05 * losses["native"]
