"""Layer-wise hyperparameters in the search (issue 24): layer_decay and
head_multiplier become `variable_groups` per model; pretrained backbones.

best.json and the exact retrain of the fine-tuning benchmark are in
tests/test_search_contract.py (`test_best_json_rebuilds_...`); the CLI's
refusals in tests/test_cli.py (`BAD_OPTIONS`).
"""

import keras
import keras_tuner
import numpy as np
import pytest

import keras_adam_plus
from keras_adam_plus import AdamPlus, layer_decay_groups
from tests.test_tuning import once_on
from tuning import SearchSpace, pretrain
from tuning.benchmarks import BENCHMARKS
from tuning.search_space import is_paper_default, optimizer_config
from tuning.sweep import search_settings


def _model():
    return keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, name="a"),
        keras.layers.Dense(4, name="b"), keras.layers.Dense(2, name="c"),
    ], name="m")


# (layer_decay, head_multiplier, multipliers of c (head), b, a).
GROUPS = [
    (0.5, 1.0, [1.0, 0.5, 0.25]),
    (0.75, 1.0, [1.0, 0.75, 0.5625]),
    (0.5, 4.0, [4.0, 0.5, 0.25]),
    (1.0, 10.0, [10.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("decay,head,multipliers", GROUPS)
def test_layerwise_values_become_layer_decay_groups(decay, head,
                                                    multipliers):
    space = SearchSpace(tune=("learning_rate", "layer_decay",
                              "head_multiplier"))
    values = {"learning_rate": 0.01, "layer_decay": decay,
              "head_multiplier": head}
    model = _model()
    kwargs = space.optimizer_kwargs(values, model)
    rules = kwargs.pop("variable_groups")
    assert kwargs == {"learning_rate": 0.01, "beta_1": 0.9,
                      "beta_2": 0.999, "epsilon": 1e-8}
    assert [r["learning_rate_multiplier"] for r in rules] == multipliers
    expected = layer_decay_groups(model, decay)
    expected[0]["learning_rate_multiplier"] *= head
    assert rules == expected
    # Without a model (trial tables), the values keep their names.
    assert space.optimizer_kwargs(values)["layer_decay"] == decay
    # best.json: the rules in place of the values; AdamPlus takes it.
    config = optimizer_config(space.optimizer_kwargs(values), None, rules)
    assert config == {**kwargs, "variable_groups": rules}
    optimizer = AdamPlus(**config)
    optimizer.build(model.trainable_variables)
    assert AdamPlus.from_config(optimizer.get_config()).get_config()[
        "variable_groups"] == rules


def test_one_learning_rate_is_plain_adam_and_the_paper_default():
    space = SearchSpace(tune=("learning_rate", "layer_decay"))
    kwargs = space.optimizer_kwargs(
        {"learning_rate": 1e-3, "layer_decay": 1.0}, _model())
    assert kwargs == {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999,
                      "epsilon": 1e-8}
    assert is_paper_default({**kwargs, "layer_decay": 1.0,
                             "head_multiplier": 1.0})
    assert not is_paper_default({**kwargs, "layer_decay": 0.9})
    assert not is_paper_default({**kwargs, "head_multiplier": 2.0})


def test_priors_defaults_and_grid_of_the_layerwise_values():
    hp = keras_tuner.HyperParameters()
    SearchSpace(tune=("layer_decay", "head_multiplier")).declare(hp)
    by_name = {h.name: h for h in hp.space}
    assert (by_name["layer_decay"].min_value, by_name["layer_decay"].max_value,
            by_name["layer_decay"].sampling, by_name["layer_decay"].default
            ) == (0.5, 1.0, "linear", 1.0)
    assert (by_name["head_multiplier"].min_value,
            by_name["head_multiplier"].max_value,
            by_name["head_multiplier"].sampling,
            by_name["head_multiplier"].default) == (0.1, 10.0, "log", 1.0)
    grid = keras_tuner.HyperParameters()
    SearchSpace(tune=("layer_decay",), grid_steps=2).declare(grid)
    assert list(grid.space[0].values) == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert grid.space[0].default == 1.0


@pytest.mark.parametrize("name", [n for n, b in BENCHMARKS.items()
                                  if not b.layerwise])
def test_layer_decay_is_refused_where_one_layer_has_variables(name):
    with pytest.raises(ValueError, match=(
            f"Argument `tune` names layer_decay, but benchmark {name}'s "
            "model has one layer with variables")):
        search_settings(name, space=SearchSpace(
            tune=("learning_rate", "layer_decay")))


# Pretraining trains a model: once, on torch (the jax run pretrains in
# test_search_contract's finetune_fashion case), for CI's budget.
@once_on("torch")
def test_the_backbone_is_pretrained_once_per_seed_and_cached(
        tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(pretrain, "_MEMORY", {})
    bench = BENCHMARKS["finetune_fashion"]
    rng = np.random.default_rng(0)
    source = (rng.random((32, 28, 28, 1), dtype=np.float32),
              rng.integers(0, 10, 32).astype("int32"))
    first = pretrain.backbone(bench, (28, 28, 1), source, seed=3)
    files = list((tmp_path / pretrain.FOLDER).iterdir())
    assert [f.name.startswith("finetune_fashion-") for f in files] == [True]
    # Every layer below the head: conv1, conv2, features (kernel, bias).
    assert [w.shape for w in first] == [(3, 3, 1, 16), (16,),
                                        (3, 3, 16, 32), (32,),
                                        (1568, 64), (64,)]
    monkeypatch.setattr(pretrain, "_MEMORY", {})
    again = pretrain.backbone(bench, (28, 28, 1), source, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # Another seed, other data: another file (not trained here: CI time).
    key = pretrain._key(bench, (28, 28, 1), source, 3)
    assert files[0].name == f"finetune_fashion-{key}.npz"
    assert key != pretrain._key(bench, (28, 28, 1), source, 4)
    assert key != pretrain._key(bench, (28, 28, 1),
                                (source[0], source[1][::-1]), 3)
    # Another AdamPlus pretrains another backbone.
    monkeypatch.setattr(keras_adam_plus, "__version__", "0.0.0-other")
    assert key != pretrain._key(bench, (28, 28, 1), source, 3)
    model = bench.build((28, 28, 1), backbone=first)
    assert np.array_equal(model.get_layer("conv1").get_weights()[0],
                          first[0])
