"""Loading optimizer state every way Keras allows (issue 12, item 7).

The state is matched by the kind and shape of each value, never by count;
a load that raises changes nothing; a load into an optimizer that is not
built yet is kept and assigned at build.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus, BetaDecay, storage

rng = np.random.default_rng(0)
X = rng.normal(size=(32, 4)).astype("float32")
Y = rng.normal(size=(32, 1)).astype("float32")


def _model(config=None, units=3):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units),
                              keras.layers.Dense(1)])
    model.compile(optimizer=AdamPlus(0.01, **(config or {})), loss="mse")
    return model


def _fit(model, epochs):
    model.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def _state(optimizer):
    return [np.asarray(ops.convert_to_numpy(v), np.float64)
            for v in optimizer.variables]


@pytest.mark.parametrize("config", [{}, dict(amsgrad=True),
                                    dict(average_decay=0.9,
                                         skip_nonfinite=True)], ids=str)
def test_load_into_unbuilt_optimizer_then_continue(config, tmp_path):
    # Was: "the saved state has 10 variables, this optimizer has 2. The
    # optimizer is not built yet" (compile then load_weights; keras-tuner's
    # get_best_models and Hyperband's continuation trials do this).
    uninterrupted = _model(config)
    _fit(uninterrupted, 3)
    first = _model(config)
    _fit(first, 2)
    path = str(tmp_path / "m.weights.h5")
    first.save_weights(path)
    resumed = _model(config)
    assert not resumed.optimizer.built
    resumed.load_weights(path)
    _fit(resumed, 1)
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 12


FRESH_CONFIGS = {
    "native": {},
    "8bit": dict(state_format="8bit", state_format_min_size=0),
    # Slots of every kind, the beta products starting at ones.
    "modes": dict(amsgrad=True, skip_nonfinite=True, average_decay=0.9,
                  use_ema=True, beta_1=BetaDecay(0.9, 0.99)),
}


@pytest.mark.parametrize("route", ["load_model", "unbuilt", "built",
                                   "trained"])
@pytest.mark.parametrize("config", list(FRESH_CONFIGS))
def test_a_never_trained_optimizer_loads_as_a_fresh_one(config, route,
                                                       tmp_path):
    # Was: "this optimizer keeps momentum, velocity, which the saved state
    # lacks": a model compiled but never trained saves its optimizer's step
    # count (0) and learning rate only (keras Adam's loads, with a warning
    # at most). Loaded, the state is a fresh one's, by every route: the
    # next step equals a fresh model's, bit for bit.
    config = FRESH_CONFIGS[config]
    fresh = _model(config)
    if route == "load_model":
        fresh.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras")
    else:
        fresh.save_weights(tmp_path / "m.weights.h5")
        loaded = _model(config)
        if route == "built":
            loaded.optimizer.build(loaded.trainable_variables)
        elif route == "trained":  # its moments and step count are reset
            _fit(loaded, 1)
        loaded.load_weights(tmp_path / "m.weights.h5")
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 0
    for model in (fresh, loaded):
        model.train_on_batch(X[:8], Y[:8])
    for a, b in zip(loaded.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert len(loaded.optimizer.variables) == len(fresh.optimizer.variables)
    for a, b in zip(_state(loaded.optimizer), _state(fresh.optimizer)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("built", [True, False])
def test_a_saved_step_count_without_moments_is_refused(built, tmp_path):
    # An unbuilt optimizer whose step count was set (Keras's set_state_tree
    # before build) saved no moments: a lost state, not a fresh one.
    source = _model()
    source.optimizer.iterations.assign(3)
    source.save_weights(tmp_path / "m.weights.h5")
    target = _model()
    if built:
        target.optimizer.build(target.trainable_variables)
    with pytest.raises(ValueError, match=(
            r"Cannot load the state of optimizer 'adam_plus': this optimizer "
            r"keeps momentum, velocity, which the saved state lacks")):
        target.load_weights(tmp_path / "m.weights.h5")


@pytest.mark.parametrize("saved, loading", [
    # Same number of variables (2 + 3 per weight), other slots.
    (dict(amsgrad=True), dict(use_ema=True)),
    (dict(amsgrad=True), dict(average_decay=0.9)),
    (dict(amsgrad=True), dict(gradient_accumulation_steps=2)),
    (dict(use_ema=True), dict(average_decay=0.9)),
], ids=str)
@pytest.mark.parametrize("built", [True, False])
def test_state_of_another_configuration_is_refused(saved, loading, built,
                                                   tmp_path):
    # Was: loaded without error into the wrong slots (EMA got the old m).
    source = _model(saved)
    _fit(source, 1)
    path = str(tmp_path / "m.weights.h5")
    source.save_weights(path)
    target = _model(loading)
    if built:
        target.optimizer.build(target.trainable_variables)
    with pytest.raises(ValueError, match=(
        r"Cannot load the state of optimizer 'adam_plus': the saved state "
        r"has .*, which this optimizer does not keep"
    )):
        target.load_weights(path)
    assert target.optimizer._pending_state is None


@pytest.mark.quick
def test_a_load_that_raises_changes_nothing(tmp_path):
    # Was: iterations and the learning rate overwritten before the raise.
    source = _model(units=5)
    source.optimizer.learning_rate = 0.5
    _fit(source, 2)
    path = str(tmp_path / "m.weights.h5")
    source.save_weights(path)
    target = _model(units=3)
    _fit(target, 1)
    before = _state(target.optimizer)
    with pytest.raises(ValueError, match=(
        r"variable adam_plus/.*momentum has shape \(4, 3\), the saved value "
        r"has shape \(4, 5\)"
    )):
        target.optimizer.load_own_variables(_store(source.optimizer))
    for a, b in zip(_state(target.optimizer), before):
        np.testing.assert_array_equal(a, b)


def _store(optimizer):
    store = {}
    optimizer.save_own_variables(store)
    return store


def test_skip_mismatch_loads_all_or_nothing(tmp_path):
    # Was: iterations loaded, moments left at zero.
    source = _model(dict(amsgrad=True))
    _fit(source, 2)
    path = str(tmp_path / "m.weights.h5")
    source.save_weights(path)
    target = _model()
    target.optimizer.build(target.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_weights(path, skip_mismatch=True)
    assert any("could not be loaded" in str(w.message) for w in caught)
    # The model's weights loaded; the optimizer's state did not, at all.
    for a, b in zip(target.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(not np.any(v) for v in _state(target.optimizer)[2:])
    assert int(ops.convert_to_numpy(target.optimizer.iterations)) == 0


@pytest.mark.parametrize("built", [True, False])
def test_state_saved_without_kinds_loads_by_count_and_shape(built):
    # Files written before the kinds were recorded hold only "0".."n-1".
    source = _model(dict(amsgrad=True))
    _fit(source, 1)
    store = _store(source.optimizer)
    del store[storage.KINDS_KEY]
    target = _model(dict(amsgrad=True))
    if built:
        target.optimizer.build(target.trainable_variables)
    target.optimizer.load_own_variables(store)
    target.optimizer.build(target.trainable_variables)
    for a, b in zip(_state(target.optimizer), _state(source.optimizer)):
        np.testing.assert_array_equal(a, b)
    other = _model()
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match=(
        r"the saved state has 14 variables, this optimizer has 10"
    )):
        other.optimizer.load_own_variables(store)


def test_keras_file_loads_with_state_and_kinds(tmp_path):
    model = _model(dict(amsgrad=True, average_decay=0.9))
    _fit(model, 1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    for a, b in zip(_state(restored.optimizer), _state(model.optimizer)):
        np.testing.assert_array_equal(a, b)
    assert storage.kinds(restored.optimizer._face())[:2] == ["iteration",
                                                     "learning_rate"]
    assert storage.kinds(restored.optimizer._face()).count("velocity_max") == 4


def test_pending_state_survives_save_and_pickle_and_yields_to_user_lr(
        tmp_path):
    # Were: a save (or pickle) before the first step wrote only iteration
    # and learning_rate (the reload then refused it), and the pending
    # assign at build overwrote a learning rate set after the load.
    import pickle

    source = _model(dict(amsgrad=True))
    _fit(source, 2)
    path = str(tmp_path / "a.weights.h5")
    source.save_weights(path)
    loaded = _model(dict(amsgrad=True))
    loaded.load_weights(path)
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 8
    again = str(tmp_path / "b.weights.h5")
    loaded.save_weights(again)
    twice = _model(dict(amsgrad=True))
    twice.load_weights(again)
    twice.optimizer.build(twice.trainable_variables)
    for a, b in zip(_state(twice.optimizer), _state(source.optimizer)):
        np.testing.assert_array_equal(a, b)
    pending = AdamPlus(0.01, amsgrad=True)
    pending.load_own_variables(_store(source.optimizer))
    unpickled = pickle.loads(pickle.dumps(pending))
    assert int(ops.convert_to_numpy(unpickled.iterations)) == 8
    unpickled.build(loaded.trainable_variables)
    for a, b in zip(_state(unpickled), _state(source.optimizer)):
        np.testing.assert_array_equal(a, b)
    # Fine-tuning: a learning rate set after the load wins.
    loaded.optimizer.learning_rate = 1e-5
    _fit(loaded, 1)
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(loaded.optimizer.learning_rate)), 1e-5,
        rtol=1e-6)
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 12
