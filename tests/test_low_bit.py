"""`state_format="8bit"` and `"4bit"`: block-wise low-bit m, v (v_max, u).

Every test runs over both formats (`FORMATS`). Checked against the
independent float64 quantizer of `tests/reference.py` to the code's own
rounding: from the package's stored codes and scales, a
float64 Adam step then the reference's quantization gives the package's
next codes, except where float32 and float64 land on opposite sides of a
midpoint between two codes (counted: a handful in tens of thousands).
Then the threshold, the memory, saving and resuming bit-exactly, the
refusals, the skip of non-finite steps, every execution, and a short
training run against float32 state.
"""

import functools
import pickle
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, lowbit
from tests.pairwise import all_pairs
from tests.reference import (
    ReferenceAdam,
    reference_dequantize,
    reference_map,
    reference_pack,
    reference_quantize,
    reference_unpack,
)

BACKEND = keras.backend.backend()
FORMATS = {"8bit": 8, "4bit": 4}  # state_format: bits per code
# 5200 elements: 20 blocks of 256 and one of 80; 40 of 128 and one of 80.
SHAPE = (40, 130)
# torch.compile takes ~30 s a model on 2 cores: behind --runslow there.
TORCH_JIT = pytest.mark.slow if BACKEND == "torch" else ()


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _state(optimizer):
    """Every optimizer variable's value, by path."""
    return {v.path: _numpy(v) for v in optimizer.variables}


def _codes(stored, bits, shape):
    """Stored codes as int64 codes of `shape` (4 bits: unpacked by the
    reference)."""
    if bits == 4:
        return reference_unpack(stored, shape)
    return np.asarray(stored).astype(np.int64).reshape(shape)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_maps_are_the_references_rounded_to_float32(bits):
    for signed in (True, False):
        want = reference_map(signed, bits)
        np.testing.assert_array_equal(lowbit.TABLES[bits, signed],
                                      want.astype(np.float32))
        assert want[-1] == 1.0 and want.shape == (2 ** bits,)
        if bits == 8:  # v's map has no zero (was bitsandbytes' 0)
            assert (want.min() < -0.99) if signed else (
                want.min() == 0.55e-7 and want[1] == 0.325e-6)
    if bits == 4:
        # torchao's create_dynamic_map(True, 3, 4) and
        # linspace(0, 1, 17)[1:], as torchao prints them (float32).
        half = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
        np.testing.assert_array_equal(
            lowbit.TABLES[4, True], np.array(
                [-x for x in half[::-1]] + [0.0] + half + [1.0], np.float32))
        np.testing.assert_array_equal(lowbit.TABLES[4, False],
                                      np.arange(1, 17, dtype=np.float32) / 16)


@pytest.mark.parametrize("bits", [8, 4])
def test_encoding_is_the_references_quantization(bits):
    rng = np.random.default_rng(0)
    values = (rng.standard_t(3, size=SHAPE) * 1e-3).astype("float32")
    values[3] = 0.0  # zeros (a whole block below) and a partial last block
    values[:2] = 0.0
    for signed in (True, False):
        x = values if signed else np.abs(values)
        codes, scales = lowbit.encode(ops.convert_to_tensor(x), signed, bits)
        want_codes, want_scales = reference_quantize(x, signed, bits)
        assert _numpy(codes).dtype == np.uint8
        assert _numpy(codes).shape == (SHAPE if bits == 8 else (2600,))
        assert _numpy(scales).shape == ({8: 21, 4: 41}[bits],)
        np.testing.assert_array_equal(_numpy(scales), want_scales)
        got = _codes(_numpy(codes), bits, SHAPE)
        differ = got != want_codes
        assert differ.sum() <= 2, differ.sum()
        assert np.all(np.abs(got - want_codes) <= 1)
        if bits == 4:  # torchao's packing, byte for byte
            np.testing.assert_array_equal(_numpy(codes),
                                          reference_pack(got))
        # The float32 map's entries are the reference's to 6e-8.
        np.testing.assert_allclose(
            _numpy(lowbit.decode(codes, scales, "float32", signed, SHAPE,
                                 bits)),
            reference_dequantize(got, _numpy(scales), signed, bits),
            rtol=2e-7, atol=0)


@pytest.mark.parametrize("key", lowbit.KEYS)
def test_the_bucket_lookup_is_a_search_over_the_midpoints(key):
    # `nearest` reads a code off the value's float32 bits; it must equal
    # the count of midpoints <= the value (the nearest entry, a tie to
    # the larger) everywhere a code can change: at both edges of every
    # bucket of every sign and exponent, and at every midpoint +- 2 ulps.
    mids = lowbit.MIDPOINTS[key]
    starts = np.arange(lowbit.LOOKUP_MASK + 1, dtype=np.uint64) << np.uint64(
        lowbit.LOOKUP_SHIFT)
    edges = [starts | np.uint64(last) for last in
             (0, 1, (1 << lowbit.LOOKUP_SHIFT) - 1)]
    near = [mids]
    for direction in (np.inf, -np.inf):
        step = mids
        for _ in range(2):
            step = np.nextafter(step, np.float32(direction))
            near.append(step)
    values = np.concatenate(
        [e.astype(np.uint32).view(np.float32) for e in edges]
        + near + [np.float32([0.0, -0.0, 1.0, -1.0])])
    values = values[np.isfinite(values)]
    got = _numpy(lowbit.nearest(ops.convert_to_tensor(values),
                                *lowbit.LOOKUPS[key]))
    want = np.searchsorted(mids, values, side="right")
    np.testing.assert_array_equal(got, want)


def test_four_bit_codes_pack_an_odd_count_and_zeros():
    # 129 elements: a block of 128 and one of 1; 65 bytes, the last low
    # nibble 0. An all-zero tensor encodes to the all-zero start state
    # (zero scales; code 0 is -0.8875 for m and 1/16 for v) and decodes
    # to zeros.
    x = np.linspace(-1.0, 1.0, 129).astype("float32").reshape(3, 43)
    for signed in (True, False):
        value = x if signed else np.abs(x)
        codes, scales = lowbit.encode(ops.convert_to_tensor(value), signed,
                                      4)
        want, want_scales = reference_quantize(value, signed, 4)
        np.testing.assert_array_equal(_numpy(codes), reference_pack(want))
        assert _numpy(codes).shape == (65,) and _numpy(codes)[-1] % 16 == 0
        np.testing.assert_array_equal(_numpy(scales), want_scales)
        np.testing.assert_allclose(
            _numpy(lowbit.decode(codes, scales, "float32", signed, (3, 43),
                                 4)),
            reference_dequantize(want, want_scales, signed, 4), rtol=2e-7,
            atol=0)
        zero_codes, zero_scales = lowbit.encode(ops.zeros((3, 43)), signed,
                                                4)
        assert not _numpy(zero_scales).any()
        np.testing.assert_array_equal(_numpy(zero_codes), reference_pack(
            np.full(129, 7 if signed else 0)))
        np.testing.assert_array_equal(_numpy(lowbit.decode(
            ops.zeros((65,), "uint8"), ops.zeros((2,)), "float32", signed,
            (3, 43), 4)), np.zeros((3, 43), np.float32))
    # The signed map's code of 0 is 7: m's zeros read 0x77.
    assert lowbit.TABLES[4, True][7] == 0.0


MODES = {
    "adam": {},
    "amsgrad_l2": dict(amsgrad=True, weight_decay=0.1,
                       weight_decay_mode="l2"),
    "adamax_decoupled": dict(adamax=True, weight_decay=0.05),
    "nesterov_hat": dict(nesterov=True, epsilon_mode="hat",
                         weight_decay=0.01,
                         weight_decay_mode="decoupled_unscaled"),
}


@pytest.mark.parametrize("state_format", list(FORMATS))
@pytest.mark.parametrize("mode", list(MODES))
def test_each_step_is_the_references_step_requantized(mode, state_format):
    # Lockstep: every step starts the float64 reference from the
    # package's stored state (dequantized by the reference) and theta.
    config, bits = MODES[mode], FORMATS[state_format]
    rng = np.random.default_rng(1)
    theta = keras.Variable(rng.normal(size=SHAPE).astype("float32"),
                           name="theta")
    optimizer = AdamPlus(learning_rate=0.01, state_format=state_format,
                         **config)
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
            _codes(before[f"adam_plus/theta_{k}"], bits, SHAPE),
            before[f"adam_plus/theta_{k}_scale"], k == "momentum", bits)
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
        # Decrements: where v's code is 0 and m's is not (8 bits: a value
        # under 1e-7 of its block's absmax) the step is m / epsilon, large
        # and as sensitive to float32 as any.
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
            codes, scales = reference_quantize(value, kind == "momentum",
                                               bits)
            got = _codes(after[f"adam_plus/theta_{kind}"], bits, SHAPE)
            np.testing.assert_allclose(
                after[f"adam_plus/theta_{kind}_scale"], scales, rtol=1e-6)
            assert np.all(np.abs(got - codes) <= 1), kind
            flips += int(np.sum(got != codes))
    assert flips <= 20, flips  # of 4 steps x 5200 x 2 or 3 codes


@pytest.mark.parametrize("state_format", list(FORMATS))
def test_the_threshold_is_per_variable(state_format):
    small = keras.Variable(np.ones((4095,), "float32"), name="small")
    large = keras.Variable(np.ones((4096,), "float32"), name="large")
    optimizer = AdamPlus(state_format=state_format)
    optimizer.build([small, large])
    slots = {v.name: (keras.backend.standardize_dtype(v.dtype),
                      tuple(v.shape)) for v in optimizer.variables}
    packed = {"8bit": (4096,), "4bit": (2048,)}[state_format]
    assert slots["small_momentum"] == ("float32", (4095,))
    assert slots["large_momentum"] == slots["large_velocity"] == (
        "uint8", packed)
    assert "small_momentum_scale" not in slots
    assert tuple(optimizer.variables[-1].shape) == (
        {"8bit": 16, "4bit": 32}[state_format],)
    block = {"8bit": 256, "4bit": 128}[state_format]
    assert optimizer.describe().splitlines()[-1] == (
        f"state_format={state_format} (blocks of {block}, min size 4096): "
        "1 of 2 variables quantized, the others keep the native format "
        "(1 under 4096 elements)")
    every = AdamPlus(state_format=state_format, state_format_min_size=0)
    every.build([small])
    assert keras.backend.standardize_dtype(
        every.variables[2].dtype) == "uint8"
    # 4095 codes: 2048 bytes, the last low nibble unused.
    assert tuple(every.variables[2].shape) == (
        {"8bit": (4095,), "4bit": (2048,)}[state_format])
    # float64 weights keep float64 state, whatever their size.
    with _x64():
        wide = keras.Variable(np.ones((4096,), "float64"), dtype="float64",
                              name="wide")
        kept = AdamPlus(state_format=state_format)
        kept.build([wide])
        assert [keras.backend.standardize_dtype(v.dtype)
                for v in kept.variables[2:]] == ["float64", "float64"]
        assert "(1 float64)" in kept.describe()


@pytest.mark.parametrize("state_format", ["8bit", "4bit"])
@pytest.mark.parametrize("small", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8])
def test_a_zero_gradient_after_a_small_one_steps_as_float32_state(
        state_format, small):
    # Step 1: gradients 1 and `small` in one block; step 2: zero gradients.
    # Was (8 bits): v's map had 0, a v under 1.6e-7 of its block's absmax
    # was stored as 0 while m was not, and the zero gradient then stepped
    # m / epsilon, thousands of times float32 state's step (a digits MLP
    # 64-256-256-10 at lr 1e-2 diverged to a loss of 5e17). Without a zero
    # in v's map a tiny v reads larger, never 0: the step stays within the
    # codes' rounding of float32 state's, or smaller.
    moves = {}
    for fmt in ("native", state_format):
        theta = keras.Variable(np.zeros((4096,), "float32"), name="theta")
        optimizer = AdamPlus(learning_rate=0.01, state_format=fmt)
        grad = np.zeros((4096,), "float32")
        grad[:2] = (1.0, small)
        optimizer.apply([ops.convert_to_tensor(grad)], [theta])
        before = _numpy(theta)
        optimizer.apply([ops.zeros((4096,))], [theta])
        moves[fmt] = np.abs(_numpy(theta) - before)
    if small == 1e-4:  # the case found: float32 state moves it 0.0067
        assert moves["native"][1] == pytest.approx(0.0067, rel=0.01)
    assert moves["native"][1] > 0
    assert np.all(moves[state_format] <= 2.0 * moves["native"])


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

    # 525,312 parameters; the biases keep float32 state.
    assert ratio("8bit") == pytest.approx(2.0429, abs=1e-4)
    assert ratio("4bit") == pytest.approx(1.0760, abs=1e-4)
    assert ratio("4bit") <= 1.1 and ratio("8bit") <= 2.1
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


@pytest.mark.parametrize("state_format", list(FORMATS))
@pytest.mark.parametrize("route", ["keras_file", "weights_h5", "pickle",
                                   "set_weights", "state_tree"])
def test_a_resumed_run_continues_bit_exactly(route, state_format, tmp_path):
    def optimizer():
        return AdamPlus(learning_rate=0.01, state_format=state_format,
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
    assert target.optimizer.state_format == state_format
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


@pytest.mark.parametrize("state_format", list(FORMATS))
@pytest.mark.parametrize("row", list(MODE_ROWS))
def test_other_modes_take_the_steps_of_float32_state(row, state_format):
    # 8-bit moments move the steps by about a code's error (1e-2); 4-bit
    # ones more (see `_close_steps`).
    changes = {}
    for fmt in ("native", state_format):
        keras.utils.set_random_seed(3)
        dtype = "bfloat16" if row.startswith("bfloat16") else "float32"
        model = keras.Sequential([
            keras.Input((64,)), keras.layers.Dense(80, dtype=dtype),
            keras.layers.Dense(3, name="out", dtype=dtype)])
        model.optimizer = AdamPlus(learning_rate=0.01, state_format=fmt,
                                   **MODE_ROWS[row])
        start = [_numpy(v).astype("float32")
                 for v in model.trainable_variables]
        _train(model, 0, 3)
        changes[fmt] = [_numpy(v).astype("float32") - s for v, s in
                        zip(model.trainable_variables, start)]
        if fmt != "native":
            kinds = [keras.backend.standardize_dtype(v.dtype)
                     for v in model.optimizer.variables]
            assert "uint8" in kinds
    for a, b in zip(changes[state_format], changes["native"]):
        _close_steps(a, b, state_format)


def _close_steps(a, b, state_format):
    """`a` (low-bit state's change of a weight) is `b` (float32 state's)
    to a code's error: 8 bits elementwise to 10%. 4 bits as a whole: v's
    linear map reads a value under 3/32 of its block's absmax as 1/16 of
    it, so small-gradient coordinates take smaller steps (v at 1/256 of
    the absmax: 4 times smaller); measured on the quantized kernel: 14% of
    the change's norm, 97% of the signs equal, one element off by 60% of
    the largest change."""
    assert np.all(np.isfinite(a))
    if state_format == "8bit":
        np.testing.assert_allclose(a, b, rtol=0.1,
                                   atol=0.1 * np.abs(b).max())
        return
    assert np.linalg.norm(a - b) <= 0.2 * np.linalg.norm(b)
    assert np.mean(np.sign(a) == np.sign(b)) >= 0.95


@pytest.mark.parametrize("state_format", list(FORMATS))
def test_another_format_is_refused_or_converted(state_format, tmp_path):
    model = _model(AdamPlus(state_format=state_format))
    model.fit(X, Y, batch_size=4, verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    native = _model(AdamPlus())
    native.optimizer.build(native.trainable_variables)
    with pytest.raises(ValueError, match="Cannot load the state of "
                       "optimizer 'adam_plus': it was saved in state format "
                       f"'{state_format}', this optimizer keeps 'native'"):
        native.load_weights(tmp_path / "m.weights.h5")
    # Another threshold: other slots keep scales.
    lower = _model(AdamPlus(state_format=state_format,
                            state_format_min_size=100))
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
    bits = FORMATS[state_format]
    codes, scales = reference_quantize(_numpy(m), True, bits)
    stored = _codes(state["adam_plus/net_hidden_kernel_momentum"], bits,
                    m.shape)
    assert np.sum(stored != codes) <= 2
    np.testing.assert_allclose(
        state["adam_plus/net_hidden_kernel_momentum_scale"], scales,
        rtol=1e-6)


@pytest.mark.parametrize("saved, loading", [("8bit", "4bit"),
                                            ("4bit", "8bit")])
def test_the_other_low_bit_format_is_refused(saved, loading, tmp_path):
    # Files and pickles name both formats; set_weights refuses the shapes
    # (8-bit codes have the variable's shape, 4-bit ones half its size).
    # Nothing is written.
    source = _model(AdamPlus(state_format=saved))
    source.fit(X, Y, batch_size=4, verbose=0)
    source.save_weights(tmp_path / "m.weights.h5")
    message = ("Cannot load the state of optimizer 'adam_plus': it was "
               f"saved in state format '{saved}', this optimizer keeps "
               f"'{loading}'. Load it into an optimizer of the saved "
               "format.")
    for built in (True, False):
        target = _model(AdamPlus(state_format=loading))
        if built:
            target.optimizer.build(target.trainable_variables)
        before = _state(target.optimizer)
        # Keras wraps it in its list of objects not loaded.
        with pytest.raises(ValueError, match=re.escape(message)):
            target.load_weights(tmp_path / "m.weights.h5")
        assert target.optimizer._pending_state is None
        assert _state(target.optimizer).keys() == before.keys()
        for path, value in before.items():
            np.testing.assert_array_equal(_state(target.optimizer)[path],
                                          value)
    # A pickle's state (with its format's name) into another config.
    unpickle, (cls, config, state) = source.optimizer.__reduce__()
    assert state[2] == saved
    with pytest.raises(ValueError) as error:
        unpickle(cls, {**config, "state_format": loading}, state)
    assert str(error.value) == message
    target.optimizer.build(target.trainable_variables)
    with pytest.raises(ValueError, match="Cannot set the weights of "
                       "optimizer 'adam_plus': .*Nothing was assigned."):
        target.optimizer.set_weights(source.optimizer.get_weights())


# Per state format: its config and what the hidden layer's m slots keep
# (the kernel's 5120 elements, then the bias's 80, in the tree's order):
# the dtype and shape a state tree carries, and the slot's own words.
TREE_FORMATS = {
    "native": ({}, [
        ("float32", (64, 80), "'native' (float32 values of shape (64, 80))"),
        ("float32", (80,), "'native' (float32 values of shape (80,))")]),
    "8bit": (dict(state_format="8bit"), [
        ("uint8", (64, 80), "'8bit' (uint8 codes of shape (64, 80))"),
        ("float32", (80,), "'native' (float32 values of shape (80,); "
         "'8bit' keeps it native: under 4096 elements)")]),
    "4bit": (dict(state_format="4bit"), [
        ("uint8", (2560,), "'4bit' (uint8 codes of shape (2560,))"),
        ("float32", (80,), "'native' (float32 values of shape (80,); "
         "'4bit' keeps it native: under 4096 elements)")]),
    "8bit_min_size_64": (dict(state_format="8bit", state_format_min_size=64), [
        ("uint8", (64, 80), "'8bit' (uint8 codes of shape (64, 80))"),
        ("uint8", (80,), "'8bit' (uint8 codes of shape (80,))")]),
}


@pytest.mark.parametrize("target", list(TREE_FORMATS))
@pytest.mark.parametrize("source", list(TREE_FORMATS))
def test_a_state_tree_of_another_format_is_refused(source, target):
    # Was: Keras's set_state_tree (and Orbax, through it) assigns by path
    # with `variable.assign`, which casts: float m landed in code slots,
    # codes (0..255) became float moments. Every slot the store makes now
    # refuses a value of another dtype kind (codes or floats) or shape.
    trained = _model(AdamPlus(learning_rate=0.01, **TREE_FORMATS[source][0]))
    _train(trained, 0, 2)
    loaded = _model(AdamPlus(learning_rate=0.01, **TREE_FORMATS[target][0]))
    loaded.optimizer.build(loaded.trainable_variables)
    tree = trained.get_state_tree()
    if source == target:
        loaded.set_state_tree(tree)
        assert _state(loaded.optimizer).keys() == _state(
            trained.optimizer).keys()
        for path, value in _state(trained.optimizer).items():
            got = _state(loaded.optimizer)[path]
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)
        for a, b in zip(loaded.get_weights(), trained.get_weights()):
            np.testing.assert_array_equal(a, b)
        return
    name, saved, kept = next(
        (name, saved, kept) for name, saved, kept in zip(
            ("kernel", "bias"), TREE_FORMATS[source][1],
            TREE_FORMATS[target][1]) if saved[:2] != kept[:2])
    with pytest.raises(ValueError) as error:
        loaded.set_state_tree(tree)
    assert str(error.value) == (
        f"Cannot assign a {saved[0]} value of shape {saved[1]} to optimizer "
        f"variable adam_plus/net_hidden_{name}_momentum: it keeps state "
        f"format {kept[2]}; a state of another state_format or "
        "state_format_min_size (a state tree, an Orbax checkpoint) is "
        "refused: load it into an optimizer of the format that saved it.")
    # Keras assigns the tree in its order, the model's weights first, then
    # the step count and the slots before the one that refuses: half
    # loaded, as docs/guide/saving.md says.
    for a, b in zip(loaded.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(loaded.optimizer.iterations) == 2


@pytest.mark.parametrize("state_format", list(FORMATS))
@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=TORCH_JIT)])
def test_a_skipped_step_leaves_codes_and_scales(jit_compile, state_format):
    model = _model(AdamPlus(state_format=state_format, skip_nonfinite=True,
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
@pytest.mark.parametrize("state_format", list(FORMATS))
def test_a_skipped_stateless_step_returns_codes_and_scales(state_format):
    theta = keras.Variable(np.ones(SHAPE, "float32"), name="theta")
    optimizer = AdamPlus(state_format=state_format, skip_nonfinite=True)
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


@pytest.mark.parametrize("state_format", list(FORMATS))
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_every_execution_takes_the_same_steps(execution, state_format):
    # Each execution's 4 steps against eager `apply`'s: the same codes but
    # where float32 round-off of another fusion crosses a midpoint.
    def run(execution):
        config = dict(learning_rate=0.01, state_format=state_format,
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
    bits = FORMATS[state_format]
    flipped = 0
    for i in codes:  # every nibble of 4-bit bytes
        a, b = (_codes(x, bits, (x.size * 8 // bits,))
                for x in (got[i], want[i]))
        assert np.sum(a != b) <= 4, i
        assert np.all(np.abs(a - b) <= 1)
        flipped += int(np.sum(a != b))
    # A flipped code moves its weight's next steps by up to a code's step
    # (in v's lowest decade, entries 2.4 to 6 times apart): such weights
    # differ by at most a few learning-rate steps, the others to round-off
    # (TensorFlow's fit_jit flipped one 8-bit v code here).
    off = 0
    for a, b in zip(model.get_weights(), reference.get_weights()):
        close = np.isclose(a, b, rtol=1e-5, atol=1e-7)
        off += int(np.sum(~close))
        np.testing.assert_allclose(a, b, atol=4 * 0.01)
    # A code may also flip and flip back within the 4 steps.
    assert off <= max(flipped, 4)


# On torch, eager steps of variables of at least `torch_compiled.MIN_SIZE`
# elements run compiled. 201 x 201 = 40401 elements: 157 blocks of 256
# and one of 209; 315 of 128 and one of 81, an odd count of nibbles.
# Each configuration is a compilation (seconds): two here.
COMPILED = {
    "8bit amsgrad decoupled float32": (
        dict(state_format="8bit", amsgrad=True, weight_decay=0.05),
        "float32"),
    "4bit adamax l2 bfloat16": (
        dict(state_format="4bit", adamax=True, weight_decay=0.05,
             weight_decay_mode="l2", beta_1=lambda t: 0.9), "bfloat16"),
}


def _built(config, dtype, generic, shape=(201, 201), seed=0):
    """`(rng, variable, optimizer)`: a variable of `shape` and `dtype`, an
    AdamPlus of `config` built for it (forced generic if `generic`)."""
    rng = np.random.default_rng(seed)
    variable = keras.Variable(rng.normal(size=shape).astype("float32"),
                              dtype=dtype)
    optimizer = AdamPlus(**dict(dict(learning_rate=0.01), **config))
    if generic:
        optimizer._force_generic = "forced by the test"
    optimizer.build([variable])
    return rng, variable, optimizer


def _gradient(rng, shape, dtype, nan=False):
    # Gradients over many decades, so that every code's range is used.
    g = rng.normal(size=shape) * np.exp(rng.normal(size=shape) * 3)
    if dtype == "float16":
        g = np.clip(g, -6e4, 6e4)  # finite in float16 (max 65504)
    if nan:
        g.flat[7] = np.nan
    return ops.cast(g.astype("float32"), dtype)


def _compiled_run(config, dtype, generic=False, steps=3):
    rng, variable, optimizer = _built(config, dtype, generic)
    for _ in range(steps):
        optimizer.apply([_gradient(rng, (201, 201), dtype)], [variable])
    return _numpy(ops.cast(variable, "float32")), optimizer


@pytest.mark.skipif(BACKEND != "torch", reason="torch's compiled path")
@pytest.mark.parametrize("chunk", [None, 16384])
@pytest.mark.parametrize("name", list(COMPILED))
def test_a_compiled_step_is_the_eager_one(name, chunk, monkeypatch):
    # The compiled step against the generic one run eagerly: the same
    # codes and scales (which, before `lowbit.grids`, inductor got wrong
    # in the last, partial block), theta within an ulp or two (torch's
    # eager `sqrt` is not correctly rounded; see `torch_compiled`). In
    # one call, or in chunks of 16384: two, then 7633 elements (29 whole
    # blocks and a partial one, an odd count of nibbles).
    from keras_adam_plus.backends import torch_compiled

    calls = []
    compiled = torch_compiled._compiled
    monkeypatch.setattr(torch_compiled, "_compiled",
                        lambda *a: calls.append(a[0].shape[0]) or compiled(*a))
    if chunk:
        monkeypatch.setattr(torch_compiled, "CHUNK", chunk)
    config, dtype = COMPILED[name]
    theta, optimizer = _compiled_run(config, dtype)
    assert calls == ([16384, 16384, 7633] if chunk else [40401]) * 3
    assert not torch_compiled._FAILED
    assert optimizer.fast_path.endswith(
        "; 1 low-bit variable of 32768 elements or more: one compiled "
        "function each when run eagerly (torch_compiled)")
    want_theta, generic = _compiled_run(config, dtype, generic=True)
    # In order (the variables' automatic names differ).
    got, want = (list(_state(o).items()) for o in (optimizer, generic))
    assert len(got) == len(want)
    assert any(v.dtype == np.uint8 for _, v in got)
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b, err_msg=path)
    # Each step's decrement (about the learning rate, 0.01) may be off
    # by an ulp or two of its own, theta by one of its own.
    np.testing.assert_allclose(theta, want_theta, rtol=2.5e-7, atol=1e-8)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's compiled path")
def test_a_failed_compilation_falls_back_to_the_generic_step(monkeypatch):
    # Without a C++ compiler inductor fails at the first call, before it
    # writes anything: one warning, then the generic step for good.
    from keras_adam_plus.backends import torch_compiled

    def fail(*args):
        raise RuntimeError("no C++ compiler\nmore lines")

    monkeypatch.setattr(torch_compiled, "_compiled", fail)
    monkeypatch.setattr(torch_compiled, "_FAILED", [])
    config, dtype = COMPILED["8bit amsgrad decoupled float32"]
    with pytest.warns(UserWarning, match=r"compiled low-bit step failed "
                      r"\(RuntimeError: no C\+\+ compiler\)"):
        theta, optimizer = _compiled_run(config, dtype)
    assert torch_compiled._FAILED == ["RuntimeError: no C++ compiler"]
    assert optimizer.fast_path.endswith(
        "; the compiled low-bit step failed (RuntimeError: no C++ "
        "compiler): every variable takes the eager step")
    want_theta, generic = _compiled_run(config, dtype, generic=True)
    np.testing.assert_array_equal(theta, want_theta)
    for a, b in zip(*(_state(o).values() for o in (optimizer, generic))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's compiled path")
def test_a_compilation_failing_after_a_chunk_finishes_the_step_eagerly(
        monkeypatch):
    # The first chunk is written when the second fails to compile: the
    # generic step over the whole variable would step that chunk twice.
    # The rest runs uncompiled, and the state is the generic step's.
    from keras_adam_plus.backends import torch_compiled

    calls = []
    compiled = torch_compiled._compiled

    def second_fails(*args):
        calls.append(args[0].shape[0])
        if len(calls) == 2:
            raise RuntimeError("no program for this shape")
        return compiled(*args)

    monkeypatch.setattr(torch_compiled, "_compiled", second_fails)
    monkeypatch.setattr(torch_compiled, "_FAILED", [])
    monkeypatch.setattr(torch_compiled, "CHUNK", 16384)
    config, dtype = COMPILED["8bit amsgrad decoupled float32"]
    with pytest.warns(UserWarning, match="no program for this shape"):
        theta, optimizer = _compiled_run(config, dtype)
    assert calls == [16384, 16384]  # then eager chunks, then the generic
    assert "failed (RuntimeError: no program" in optimizer.fast_path
    want_theta, generic = _compiled_run(config, dtype, generic=True)
    np.testing.assert_allclose(theta, want_theta, rtol=2.5e-7, atol=1e-8)
    for (path, a), (_, b) in zip(*(_state(o).items()
                                   for o in (optimizer, generic))):
        np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's compiled path")
def test_a_non_contiguous_variable_takes_the_generic_step(monkeypatch):
    # Keras keeps a transposed array's strides: no flat view of it to
    # step in chunks (the view raised), so the generic step runs.
    from keras_adam_plus.backends import torch_compiled

    _forbid(monkeypatch, torch_compiled, "_compiled")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(256, 201)).astype("float32").T
    gradient = _gradient(rng, (201, 256), "float32")
    states = []
    for generic in (False, True):
        variable = keras.Variable(start)
        assert not variable.value.is_contiguous()
        optimizer = AdamPlus(state_format="8bit")
        if generic:
            optimizer._force_generic = "forced by the test"
        optimizer.build([variable])
        optimizer.apply([gradient], [variable])
        states.append([_numpy(variable)] + list(_state(optimizer).values()))
    for a, b in zip(*states):
        np.testing.assert_array_equal(a, b)


def _forbid(monkeypatch, module, name):
    """Makes a call of `module.name` fail the test."""
    def fail(*args):
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(module, name, fail)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's compiled path")
def test_small_forced_and_stateless_steps_are_not_compiled(monkeypatch):
    from keras_adam_plus.backends import torch_compiled

    _forbid(monkeypatch, torch_compiled, "_compiled")
    config, dtype = COMPILED["8bit amsgrad decoupled float32"]
    _compiled_run(config, dtype, generic=True, steps=1)  # forced generic
    small = keras.Variable(np.ones((181, 181), "float32"))  # 32761
    optimizer = AdamPlus(state_format="8bit")
    optimizer.build([small])
    optimizer.apply([ops.ones((181, 181))], [small])
    assert int(optimizer.iterations) == 1
    assert "torch_compiled" not in optimizer.fast_path  # none that large
    assert AdamPlus(state_format="8bit").fast_path.endswith(  # unbuilt
        "; low-bit variables of 32768 elements or more: one compiled "
        "function each when run eagerly (torch_compiled)")
    large = keras.Variable(np.ones((201, 201), "float32"))
    optimizer = AdamPlus(state_format="8bit")
    optimizer.build([large])
    state = [v.value for v in optimizer.variables]
    values, state = optimizer.stateless_apply(state, [ops.ones((201, 201))],
                                              [large.value])
    assert not torch_compiled._FAILED


def _jitted_run(config, dtype, generic=False, steps=3, nonfinite=(),
                shape=(201, 201), seed=0):
    # As `fit` runs a step: `stateless_apply` inside `jax.jit` (on
    # TensorFlow, a `tf.function` XLA compiles). Steps in `nonfinite` get
    # a NaN gradient.
    rng, variable, optimizer = _built(config, dtype, generic, shape, seed)
    if BACKEND == "tensorflow":  # no `stateless_apply` on TensorFlow
        import tensorflow as tf

        apply = tf.function(lambda g: optimizer.apply(g, [variable]),
                            jit_compile=True)
        for i in range(steps):
            apply([_gradient(rng, shape, dtype, nan=i in nonfinite)])
        return [_numpy(ops.cast(variable, "float32"))] + [
            _numpy(v) for v in optimizer.variables], optimizer
    import jax

    apply = jax.jit(optimizer.stateless_apply)
    values, state = [variable.value], [v.value for v in optimizer.variables]
    for i in range(steps):
        values, state = apply(state, [_gradient(rng, shape, dtype,
                                                nan=i in nonfinite)], values)
    return [_numpy(ops.cast(values[0], "float32"))] + [
        _numpy(v) for v in state], optimizer


CHUNKED = pytest.mark.skipif(BACKEND != "jax", reason="JAX's chunked path")
# The loop's own tests, on JAX and on TensorFlow under XLA (whose path
# takes variables from `chunked.MIN_SIZE` here: `_chunked_tf`).
LOOPED = pytest.mark.skipif(BACKEND == "torch", reason="chunked loop (XLA)")


@pytest.fixture
def _chunked_tf(monkeypatch):
    if BACKEND == "tensorflow":
        from keras_adam_plus.backends import chunked, tf_chunked

        monkeypatch.setattr(tf_chunked, "MIN_SIZE", chunked.MIN_SIZE)


@LOOPED
@pytest.mark.parametrize("name", list(COMPILED))
def test_a_chunked_step_is_the_generic_one(name, monkeypatch, _chunked_tf):
    # The chunked loop against the generic step, both inside one jitted
    # step as `fit` runs them (201 * 201 elements: two whole chunks, then
    # a tail of whole blocks and a partial one, an odd count of nibbles
    # for 4 bits).
    from keras_adam_plus.backends import chunked

    calls = []
    loop = chunked.loop
    monkeypatch.setattr(chunked, "loop",
                        lambda *a: calls.append(1) or loop(*a))
    if BACKEND == "jax":
        from keras_adam_plus.backends import jax_chunked

        monkeypatch.setattr(jax_chunked, "_PROGRAMS", {})
    config, dtype = COMPILED[name]
    got, optimizer = _jitted_run(config, dtype)
    assert calls == [1]  # traced once, run three times
    assert optimizer.fast_path.endswith(
        "; 1 low-bit variable of 32768 elements or more: one loop each "
        "over chunks of about 131072 " + (
            "(jax_chunked)" if BACKEND == "jax" else
            "under XLA (tf_chunked)"))
    want, generic = _jitted_run(config, dtype, generic=True)
    assert calls == [1]
    assert any(v.dtype == np.uint8 for v in got)
    _same_but_theta_ulp(got, want, optimizer, dtype)


# The chunked loop's space: where a variable's last chunk ends (exactly 2
# chunks; a tail of 1 element; a tail of whole 4-bit blocks and half an
# 8-bit one, in 4-D; three chunks of no multiple of `TARGET`, then
# whole blocks and a partial one), each mode's reads and writes, both
# formats and the weights' dtypes, sampled by pairs.
CHUNK_SHAPES = [(128, 256), (32769,), (1, 3, 97, 113), (2, 195001)]
CHUNK_MODES = {
    "nesterov lr schedule": dict(nesterov=True, learning_rate=(
        keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.5))),
    "amsgrad unscaled wd ema": dict(
        amsgrad=True, weight_decay=0.1,
        weight_decay_mode="decoupled_unscaled", use_ema=True),
    "hat no bias correction accumulation": dict(
        epsilon_mode="hat", bias_correction=False,
        gradient_accumulation_steps=2),
    "groups beta schedule average": dict(
        beta_2=lambda t: 0.99, average_decay=0.9, variable_groups=[
            {"match": ".*", "learning_rate_multiplier": 0.5}]),
}
CHUNK_CELLS = all_pairs([CHUNK_SHAPES, list(CHUNK_MODES), list(FORMATS),
                         ["float32", "bfloat16", "float16"]])


@LOOPED
@pytest.mark.parametrize("shape,mode,state_format,dtype", CHUNK_CELLS)
def test_every_chunk_layout_and_mode_is_the_generic_step(
        shape, mode, state_format, dtype, _chunked_tf):
    def run(generic):
        return _jitted_run(dict(CHUNK_MODES[mode], state_format=state_format),
                           dtype, generic, shape=shape, seed=1)

    got, optimizer = run(False)
    assert "_chunked)" in optimizer.fast_path
    want, _ = run(True)
    _same_but_theta_ulp(got, want, optimizer, dtype)


def _same_but_theta_ulp(got, want, optimizer, dtype):
    # Codes, scales and every other variable bit for bit; theta within an
    # ulp of its dtype, or 2.5e-7: XLA contracts a multiply and an add
    # where its fusions allow, and the chunked program fuses theta's
    # update differently. Nesterov's numerator `beta_1 * m / c1_next +
    # (1 - beta_1) * g / c1` cancels where m and g are large and opposed,
    # which makes that ulp of its terms about 1e-7 of theta.
    assert len(got) == len(want) == 1 + len(optimizer.variables)
    ulp = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7,
           "float16": 2.0 ** -10}[dtype]
    np.testing.assert_allclose(_numpy(ops.cast(got[0], "float32")),
                               _numpy(ops.cast(want[0], "float32")),
                               rtol=ulp, atol=2.5e-7, err_msg="theta")
    for a, b, variable in zip(got[1:], want[1:], optimizer.variables):
        np.testing.assert_array_equal(_numpy(a), _numpy(b),
                                      err_msg=variable.path)


@CHUNKED
@pytest.mark.parametrize("name", list(COMPILED))
def test_an_eager_chunked_step_is_the_generic_one_but_for_fusion(name):
    # Run eagerly, the chunked step is one compiled program and the
    # generic step is op by op: XLA's fusions (a multiply and an add
    # contracted) move some values by an ulp, a scale with them, and so,
    # rarely, a code by one.
    config, dtype = COMPILED[name]
    theta, optimizer = _compiled_run(config, dtype)
    want_theta, generic = _compiled_run(config, dtype, generic=True)
    ulp = 2.0 ** -23 if dtype == "float32" else 2.0 ** -7
    np.testing.assert_allclose(theta, want_theta, rtol=2 * ulp, atol=1e-8)
    bits = 4 if "4bit" in name else 8
    for (path, a), (_, b) in zip(*(_state(o).items()
                                   for o in (optimizer, generic))):
        if a.dtype != np.uint8:
            np.testing.assert_allclose(a, b, rtol=2.5e-7, err_msg=path)
            continue
        a, b = (_numpy(lowbit.unpack(x.reshape(-1), 2 * x.size))
                if bits == 4 else x for x in (a, b))
        off = np.abs(a.astype(int) - b.astype(int))
        assert off.max() <= 1 and np.mean(off > 0) < 1e-3, path


def test_the_chunk_layout_is_equal_chunks_of_whole_blocks_and_a_short_rest():
    # Every size from `MIN_SIZE`, each one up to 4 chunks and then a
    # sample: at least two chunks (XLA inlines a loop of one, which then
    # runs as the slow generic step), of whole blocks of both widths (an
    # even count), about `TARGET` elements, and a rest under a block a
    # chunk.
    from keras_adam_plus.backends import chunked

    target, grain = chunked.TARGET, chunked.GRAIN
    sizes = list(range(chunked.MIN_SIZE, 4 * target + 600)) + [
        int(n) for n in np.geomspace(4 * target, 10 ** 9, 400)]
    for n in sizes:
        size, count = chunked.layout(n)
        rest = n - size * count
        assert count >= 2 and size > 0 and size % grain == 0, n
        assert size % lowbit.BLOCKS[8] == 0 == size % (2 * lowbit.BLOCKS[4])
        assert 0 <= rest < count * (grain + 1), n
        if n >= 3 * target:
            assert target / 1.5 < size <= target * 1.5, n
    assert chunked.layout(chunked.MIN_SIZE) == (16384, 2)
    assert chunked.layout(3 * 131075) == (131072, 3)
    assert chunked.layout(2 * 195001) == (129792, 3)  # rest 626


@CHUNKED
def test_small_and_forced_steps_are_not_chunked(monkeypatch):
    from keras_adam_plus.backends import chunked, jax_chunked

    _forbid(monkeypatch, chunked, "loop")
    monkeypatch.setattr(jax_chunked, "_PROGRAMS", {})
    config, dtype = COMPILED["8bit amsgrad decoupled float32"]
    _jitted_run(config, dtype, generic=True, steps=1)  # forced generic
    small = keras.Variable(np.ones((181, 181), "float32"))  # 32761
    optimizer = AdamPlus(state_format="8bit")
    optimizer.build([small])
    optimizer.apply([ops.ones((181, 181))], [small])
    assert int(optimizer.iterations) == 1
    assert "jax_chunked" not in optimizer.fast_path  # none that large
    # Measured on CPUs only: on a GPU the generic step runs.
    monkeypatch.setattr(jax_chunked.jax, "default_backend", lambda: "gpu")
    _jitted_run(config, dtype, steps=1)
    assert AdamPlus(state_format="8bit").fast_path.endswith(  # unbuilt
        "; low-bit variables of 32768 elements or more: one loop each "
        "over chunks of about 131072 (jax_chunked)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's loop")
def test_tensorflow_loops_only_under_xla_and_from_its_min_size(monkeypatch):
    # Eagerly and in a `tf.function` without XLA a loop would be a kernel
    # per operation per chunk; under XLA, variables under
    # `tf_chunked.MIN_SIZE` keep the generic step (each loop adds to the
    # compilation).
    import tensorflow as tf

    from keras_adam_plus import nonfinite
    from keras_adam_plus.backends import chunked, tf_chunked

    _forbid(monkeypatch, chunked, "loop")
    config, dtype = COMPILED["8bit amsgrad decoupled float32"]
    _jitted_run(config, dtype, steps=1)  # 40401 < 2**20, under XLA
    assert not nonfinite.in_xla()
    monkeypatch.setattr(tf_chunked, "MIN_SIZE", chunked.MIN_SIZE)
    for wrap in (lambda f: f, tf.function,  # eagerly; graphs, no XLA
                 lambda f: tf.function(f, jit_compile=False)):
        rng, variable, optimizer = _built(config, dtype, False)
        gradient = _gradient(rng, (201, 201), dtype)
        wrap(functools.partial(optimizer.apply, [gradient], [variable]))()
        assert int(optimizer.iterations) == 1
    assert tf.function(nonfinite.in_xla, jit_compile=True)()
    # Measured on CPUs only: a variable on a GPU keeps the generic step.
    monkeypatch.setattr(tf_chunked, "_device", lambda v: "/device:GPU:0")
    _jitted_run(config, dtype, steps=1)
    assert AdamPlus(state_format="8bit").fast_path.endswith(  # unbuilt
        "; low-bit variables of 32768 elements or more: one loop each "
        "over chunks of about 131072 under XLA (tf_chunked)")


@CHUNKED
def test_the_chunked_programs_kept_are_bounded(monkeypatch):
    # Each optimizer whose beta is a new lambda is a new configuration;
    # the cache of jitted programs kept every one of them (review).
    from keras_adam_plus.backends import jax_chunked

    monkeypatch.setattr(jax_chunked, "_PROGRAMS", {})
    monkeypatch.setattr(jax_chunked, "MAX_PROGRAMS", 2)
    for i in range(4):
        _, optimizer = _compiled_run(
            dict(state_format="8bit", beta_1=lambda t, i=i: 0.9), "float32",
            steps=1)
        assert len(jax_chunked._PROGRAMS) == min(i + 1, 2)
    assert [key[0] for key in jax_chunked._PROGRAMS][-1] is (
        optimizer._plan.hyper)


@LOOPED
def test_a_skipped_chunked_step_leaves_the_state_bit_for_bit(_chunked_tf):
    # `skip_nonfinite` guards every write of a traced step: the chunked
    # step's too. A NaN step leaves theta, codes and scales as they were,
    # and the steps around it are the generic step's.
    config, dtype = COMPILED["4bit adamax l2 bfloat16"]
    config = dict(config, skip_nonfinite=True)
    got, optimizer = _jitted_run(config, dtype, steps=3, nonfinite=(1,))
    want, generic = _jitted_run(config, dtype, steps=3, nonfinite=(1,),
                                generic=True)
    assert "_chunked)" in optimizer.fast_path
    paths = ["theta"] + [v.path for v in optimizer.variables]
    for a, b, path in zip(got, want, paths):
        np.testing.assert_array_equal(a, b, err_msg=path)
    before, _ = _jitted_run(config, dtype, steps=1)
    after, _ = _jitted_run(config, dtype, steps=2, nonfinite=(1,))
    for a, b, path in zip(before, after, paths):
        if path.endswith("skipped_steps"):
            assert (int(a), int(b)) == (0, 1)
        elif not path.endswith("iteration"):
            np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.parametrize("state_format", list(FORMATS))
def test_arguments_are_checked_and_configured(state_format):
    with pytest.raises(ValueError, match=r"^Argument `state_format` must be "
                       r"one of \"native\", \"8bit\", \"4bit\". Received: "
                       r"state_format='2bit'$"):
        AdamPlus(state_format="2bit")
    with pytest.raises(ValueError, match=r"^Argument `state_format_min_size`"
                       r" must be an integer >= 0. Received: "
                       r"state_format_min_size=-1$"):
        AdamPlus(state_format_min_size=-1)
    for flag in ("lazy_sparse", "group_small_variables"):
        with pytest.raises(ValueError, match=(
                rf"^Argument `state_format` '{state_format}' cannot combine "
                rf"with `{flag}=True` yet \(.*\)\. Received: "
                rf"state_format='{state_format}', {flag}=True$")):
            AdamPlus(state_format=state_format, **{flag: True})
    optimizer = AdamPlus(state_format=state_format, state_format_min_size=10)
    config = optimizer.get_config()
    assert config["state_format"] == state_format
    assert config["state_format_min_size"] == 10
    again = AdamPlus.from_config(config)
    assert (again.state_format, again.state_format_min_size) == (
        state_format, 10)
    assert again._state_format.bits == FORMATS[state_format]
    old = {k: v for k, v in config.items() if not k.startswith("state_")}
    assert AdamPlus.from_config(old).state_format == "native"
    assert f"state format '{state_format}'" in optimizer.fast_path
    assert AdamPlus(state_format_min_size=np.int64(5)) \
        .state_format_min_size == 5


def test_digits_train_as_with_float32_state():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    losses = {}
    for state_format in ("native", *FORMATS):
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
    for state_format in FORMATS:  # measured: +2.3% (8bit), +0.4% (4bit)
        assert abs(losses[state_format] - losses["native"]) <= (
            0.05 * losses["native"]), losses
