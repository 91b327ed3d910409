"""A state format per group: `variable_groups` rules with `state_format`.

An optimizer whose groups keep different formats must equal one AdamPlus
per group (one 8-bit, one native), each applied to its own variables:
weights, codes, scales and float moments bit for bit after several steps,
on every backend's path (torch fuses the native groups, as a native
optimizer does, and runs the generic step on the quantized ones). Its
config, pickle and `.keras` file carry the formats; a state loads only
into an optimizer that keeps each variable in its saved format, else it is
refused in one line; bad rules are refused at construction.
"""

import pickle

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, lowbit, storage, validation
from tests.helpers import make_variables
from tests.test_low_bit import _train  # steps on fixed gradients

BACKEND = keras.backend.backend()
# 1200, 600 and 20 elements: quantized with a min size of 0; with 100 the
# bias keeps the native format inside an 8-bit group.
SHAPES = {"embedding": (40, 30), "kernel": (30, 20), "bias": (20,)}
ROWS = {
    # bitsandbytes' StableEmbedding advice: embeddings keep 32-bit state.
    "8bit_optimizer_native_embedding": (
        dict(state_format="8bit", state_format_min_size=100),
        {"match": "^embedding", "state_format": "native"}),
    # The reverse: one large group in 8 bits.
    "native_optimizer_8bit_kernel": (
        dict(), {"match": "^kernel", "state_format": "8bit",
                 "state_format_min_size": 0}),
    "amsgrad_decay_own_betas": (
        dict(state_format="8bit", state_format_min_size=0, amsgrad=True,
             weight_decay=0.05),
        {"match": "^embedding", "state_format": "native", "beta_2": 0.99,
         "weight_decay": 0.0}),
    # 4 bits for one group beside 8 bits (packed codes and blocks of 128
    # beside 256), and 4 bits in a native optimizer.
    "8bit_optimizer_4bit_kernel": (
        dict(state_format="8bit", state_format_min_size=0),
        {"match": "^kernel", "state_format": "4bit"}),
    "native_optimizer_4bit_embedding": (
        dict(amsgrad=True), {"match": "^embedding", "state_format": "4bit",
                             "state_format_min_size": 0}),
    "nesterov_l2_8bit_rule": (
        dict(nesterov=True, weight_decay=0.01, weight_decay_mode="l2"),
        {"match": "^(kernel|bias)$", "state_format": "8bit",
         "state_format_min_size": 0, "epsilon": 1e-6}),
}


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return make_variables([rng.normal(size=s).astype("float32")
                           for s in SHAPES.values()], list(SHAPES))


def _grads(steps=4, seed=1):
    rng = np.random.default_rng(seed)
    return [[(rng.normal(size=s) * 10.0 ** rng.integers(-4, 0, size=s))
             .astype("float32") for s in SHAPES.values()]
            for _ in range(steps)]


def _state(optimizer):
    return {v.path: _numpy(v) for v in optimizer.variables}


@pytest.mark.parametrize("row", list(ROWS))
def test_mixed_formats_equal_one_optimizer_per_group(row):
    config, rule = ROWS[row]
    variables = _variables()
    together = AdamPlus(0.01, variable_groups=[rule], **config)
    # A rule's keys are the optimizer's arguments of the same name.
    own = AdamPlus(0.01, **{**config, **{k: v for k, v in rule.items()
                                         if k != "match"}})
    rest = AdamPlus(0.01, **config)
    parts = _variables()
    together.build(variables)
    mine = [k == 1 for k in together._plan.setting_of]  # the rule's
    for step in _grads():
        together.apply([ops.convert_to_tensor(g) for g in step], variables)
        for optimizer, take in ((own, True), (rest, False)):
            optimizer.apply(
                [ops.convert_to_tensor(g)
                 for g, m in zip(step, mine) if m == take],
                [v for v, m in zip(parts, mine) if m == take])
    assert any(mine) and not all(mine)
    for got, want in zip(variables, parts):
        np.testing.assert_array_equal(_numpy(got), _numpy(want))
    got = _state(together)
    want = {**_state(rest), **_state(own)}
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(got[path], value, path)
    kinds = {p: v.dtype for p, v in got.items()}
    assert np.uint8 in kinds.values() and np.float32 in kinds.values()
    native = own if own.state_format == "native" else rest
    if native.fast_path == "torch_fused":  # the native group fused too
        quantized = {config.get("state_format"), rule.get("state_format")}
        assert any(together.fast_path.startswith(
            f"torch_fused (state format '{fmt}' in ")
            for fmt in quantized - {None, "native"})
        assert together.fast_path.endswith(", the other groups native, "
                                           "fused)")
    else:
        assert together.fast_path.startswith("generic (")


@pytest.mark.skipif(BACKEND == "tensorflow", reason="Keras has no "
                    "stateless_apply on TensorFlow")
def test_stateless_apply_takes_the_steps_of_apply():
    # On torch: the fused kernel on copies for the native group, the
    # generic step on the 8-bit one, in one StatelessScope.
    config, rule = ROWS["amsgrad_decay_own_betas"]
    runs = []
    for stateless in (False, True):
        variables = _variables()
        optimizer = AdamPlus(0.01, variable_groups=[rule], **config)
        optimizer.build(variables)
        state = [v.value for v in optimizer.variables]
        values = [v.value for v in variables]
        for step in _grads():
            grads = [ops.convert_to_tensor(g) for g in step]
            if stateless:
                values, state = optimizer.stateless_apply(state, grads,
                                                          values)
            else:
                optimizer.apply(grads, variables)
        if stateless:
            for v, value in zip(optimizer.variables + variables,
                                list(state) + list(values)):
                v.assign(value)
        runs.append([_numpy(v) for v in optimizer.variables + variables])
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_describe_and_fast_path_name_each_groups_format():
    optimizer = AdamPlus(state_format="8bit", variable_groups=[
        {"match": "^embedding", "state_format": "native",
         "name": "embeddings"},
        {"match": "^kernel", "state_format_min_size": 0}])
    optimizer.build(_variables())
    lines = optimizer.describe().splitlines()
    assert lines[0].endswith("epsilon=1e-08, state_format=8bit: 1 variable")
    assert lines[2].startswith("embeddings: ")
    assert lines[2].endswith(", state_format=native: 1 variable")
    assert lines[-2:] == [
        "default: state_format=8bit (blocks of 256, min size 4096): 0 of 1 "
        "variables quantized, the others keep the native format (1 under "
        "4096 elements)",
        "variable_groups[1]: state_format=8bit (blocks of 256, min size 0): "
        "1 of 1 variables quantized"]
    if BACKEND == "torch":
        assert optimizer.fast_path == (
            "torch_fused (state format '8bit' in default; '8bit' in "
            "variable_groups[1], the other groups native, fused)")
    else:
        assert optimizer.fast_path == (
            "generic (state format '8bit' in default; '8bit' in "
            "variable_groups[1], the other groups native)")
    # Without a rule's format: one line for the optimizer, as before.
    plain = AdamPlus(state_format="8bit", variable_groups=[
        {"match": "^kernel", "learning_rate_multiplier": 0.5}])
    plain.build(_variables())
    assert "state_format=" not in plain.describe().splitlines()[0]
    assert plain.describe().splitlines()[-1].startswith(
        "state_format=8bit (blocks of 256")
    if BACKEND == "torch":  # every variable quantized: nothing to fuse
        everything = AdamPlus(variable_groups=[
            {"match": ".", "state_format": "8bit"}])
        everything.build(_variables())
        assert everything.fast_path == (
            "generic (state format '8bit': the fused kernel reads and "
            "writes m, v as they are stored)")


def test_every_format_name_is_registered():
    assert set(validation.STATE_FORMATS) == {"native", *lowbit.FORMATS}
    assert lowbit.format_of("native", 0) is storage.NATIVE
    assert lowbit.format_of("8bit", 7).min_size == 7


BAD = [
    ("unknown format", dict(variable_groups=[
        {"match": "a", "state_format": "2bit"}]), ValueError,
     "Argument `variable_groups[0]['state_format']` must be one of "
     "\"native\", \"8bit\", \"4bit\". Received: "
     "variable_groups[0]['state_format']='2bit'"),
    ("format not a string", dict(variable_groups=[
        {"match": "a"}, {"match": "b", "state_format": 8}]), ValueError,
     "Argument `variable_groups[1]['state_format']` must be one of "
     "\"native\", \"8bit\", \"4bit\". Received: "
     "variable_groups[1]['state_format']=8"),
    ("negative min size", dict(state_format="8bit", variable_groups=[
        {"match": "a", "state_format_min_size": -1}]), ValueError,
     "Argument `variable_groups[0]['state_format_min_size']` must be an "
     "integer >= 0. Received: variable_groups[0]['state_format_min_size']=-1"),
    ("min size of a native group", dict(variable_groups=[
        {"match": "a", "state_format_min_size": 0}]), ValueError,
     "Argument `variable_groups[0]['state_format_min_size']` needs a "
     "quantized `state_format` in its group, which keeps \"native\" state. "
     "Received: variable_groups[0]={'match': 'a', "
     "'state_format_min_size': 0}"),
    ("8bit rule with lazy_sparse", dict(lazy_sparse=True, variable_groups=[
        {"match": "a", "state_format": "8bit"}]), ValueError,
     "Argument `variable_groups[0]['state_format']` '8bit' cannot combine "
     "with `lazy_sparse=True` yet (sparse rows would need their blocks "
     "decoded and encoded whole). Received: "
     "variable_groups[0]['state_format']='8bit', lazy_sparse=True"),
    ("8bit rule with groups of small variables", dict(
        group_small_variables=True, variable_groups=[
            {"match": "a"}, {"match": "b", "state_format": "8bit"}]),
     ValueError,
     "Argument `variable_groups[1]['state_format']` '8bit' cannot combine "
     "with `group_small_variables=True` yet (flat groups would share "
     "blocks across variables). Received: "
     "variable_groups[1]['state_format']='8bit', group_small_variables=True"),
    ("8bit optimizer, native rule, groups of small variables", dict(
        state_format="8bit", group_small_variables=True,
        variable_groups=[{"match": "a", "state_format": "native"}]),
     ValueError, "Argument `state_format` '8bit' cannot combine with "
     "`group_small_variables=True` yet"),
]


@pytest.mark.parametrize("config, error, message", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_format_rules_are_refused_at_construction(config, error,
                                                      message):
    with pytest.raises(error) as info:
        AdamPlus(**config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_native_rules_combine_with_every_path():
    # A native format for every group refuses nothing.
    AdamPlus(lazy_sparse=True, group_small_variables=True, variable_groups=[
        {"match": "a", "state_format": "native"}])


def _model(rules, state_format="8bit"):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(80, name="hidden"),
                              keras.layers.Dense(3, name="out")], name="net")
    model.compile(optimizer=AdamPlus(
        learning_rate=0.01, state_format=state_format, amsgrad=True,
        state_format_min_size=0, variable_groups=rules), loss="mse")
    return model


NATIVE_HIDDEN = [{"match": "hidden/", "state_format": "native",
                  "learning_rate_multiplier": 0.5}]
@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("route", ["keras_file", "pickle", "set_weights"])
def test_a_mixed_state_resumes_bit_exactly(route, fmt, tmp_path):
    # Fixed gradients, not `fit`: on torch, `fit` of a loaded model may
    # round its gradients 1 ulp off the original's (keras Adam's too).
    straight = _model(NATIVE_HIDDEN, fmt)
    _train(straight, 0, 4)
    source = _model(NATIVE_HIDDEN, fmt)
    _train(source, 0, 2)
    if route == "keras_file":
        source.save(tmp_path / "m.keras")
        target = keras.models.load_model(tmp_path / "m.keras")
        assert target.optimizer.get_config() == source.optimizer.get_config()
    elif route == "pickle":
        target = _model(None, fmt)
        target.compile(optimizer=pickle.loads(pickle.dumps(
            source.optimizer)), loss="mse")
        target.set_weights(source.get_weights())
    else:
        target = _model(NATIVE_HIDDEN, fmt)
        target.optimizer.build(target.trainable_variables)
        target.set_weights(source.get_weights())
        target.optimizer.set_weights(source.optimizer.get_weights())
    assert target.optimizer.variable_groups == NATIVE_HIDDEN
    _train(target, 2, 4)
    for got, want in zip(target.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(got, want)
    # In order: a loaded model's paths may hold its name ("net/").
    got = list(_state(target.optimizer).values())
    want = list(_state(straight.optimizer).values())
    assert len(got) == len(want)
    assert {v.dtype.name for v in want} >= {"uint8", "float32"}
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_the_config_carries_each_groups_format():
    rules = [{"match": "embedding", "state_format": "native",
              "name": "embeddings"},
             {"match": "kernel", "state_format": "8bit",
              "state_format_min_size": 10}]
    optimizer = AdamPlus(state_format="8bit", state_format_min_size=100,
                         variable_groups=rules)
    config = optimizer.get_config()
    assert config["variable_groups"] == rules
    for clone in (AdamPlus.from_config(config),
                  pickle.loads(pickle.dumps(optimizer)),
                  keras.optimizers.deserialize(
                      keras.optimizers.serialize(optimizer))):
        assert clone.get_config() == config
        formats = clone._make_plan(()).group_formats
        assert [(f.name, getattr(f, "min_size", None)) for f in formats] == [
            ("8bit", 100), ("native", None), ("8bit", 10)]


def test_the_saved_record_is_per_variable_where_formats_differ():
    mixed = _model(NATIVE_HIDDEN)
    _train(mixed, 0, 1)
    store = {}
    mixed.optimizer.save_own_variables(store)
    record = storage._decode(store[storage.FORMAT_KEY])
    assert record == ["native", "native", "8bit", "8bit"]
    plain = _model([{"match": "hidden/", "learning_rate_multiplier": 0.5}])
    _train(plain, 0, 1)
    store = {}
    plain.optimizer.save_own_variables(store)
    assert storage._decode(store[storage.FORMAT_KEY]) == "8bit"


OTHER_FORMATS = {
    # (rules, optimizer's format, refused at load before build)
    "all_8bit": (None, "8bit", True),
    "all_native": (None, "native", True),
    "the_other_layer_native": (
        [{"match": "out/", "state_format": "native"}], "8bit", False),
}


@pytest.mark.parametrize("other", list(OTHER_FORMATS))
@pytest.mark.parametrize("built", [True, False])
def test_a_mixed_state_is_refused_by_other_formats(other, built):
    source = _model(NATIVE_HIDDEN)
    _train(source, 0, 1)
    store = {}
    source.optimizer.save_own_variables(store)
    rules, state_format, early = OTHER_FORMATS[other]
    target = _model(rules, state_format)
    optimizer = target.optimizer
    if built:
        optimizer.build(target.trainable_variables)
    before = [_numpy(v) for v in optimizer.variables]
    if built:
        message = (
            r"^Cannot load the state of optimizer 'adam_plus': variable "
            r"(net/)?(hidden|out)/kernel was saved in state format '\w+', this "
            r"optimizer keeps it in '\w+' \(`state_format` or a "
            r"`variable_groups` rule's differs from the saver's\)\. Load it "
            r"into an optimizer of the saved formats\.$")
    else:
        message = (
            r"^Cannot load the state of optimizer 'adam_plus': it was saved "
            r"in state format '8bit' and 'native' \(per variable\), this "
            rf"optimizer keeps '{state_format}'\. Load it into an optimizer "
            r"of the saved format\.$")
    if built or early:
        with pytest.raises(ValueError, match=message):
            optimizer.load_own_variables(store)
        for a, v in zip(before, optimizer.variables):
            np.testing.assert_array_equal(a, _numpy(v))
        return
    # Before build, the variables' formats are known only at build.
    optimizer.load_own_variables(store)
    with pytest.raises(ValueError, match=r"variable (net/)?hidden/kernel was "
                       r"saved in state format 'native', this optimizer "
                       r"keeps it in '8bit'"):
        optimizer.build(target.trainable_variables)
