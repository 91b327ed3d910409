"""Every invalid argument raises at construction, with a pinned message."""

import json
import re

import keras
import numpy as np
import pytest

from keras_adam_plus import AdamPlus

pytestmark = pytest.mark.quick

LR_TYPES = (
    "a float, a `keras.optimizers.schedules.LearningRateSchedule` or a "
    "callable"
)

# (kwargs, exception, exact message)
INVALID = [
    (dict(learning_rate=-0.1), ValueError,
     "Argument `learning_rate` must be >= 0. Received: learning_rate=-0.1"),
    (dict(learning_rate=float("nan")), ValueError,
     "Argument `learning_rate` must be finite. Received: learning_rate=nan"),
    (dict(learning_rate=float("inf")), ValueError,
     "Argument `learning_rate` must be finite. Received: learning_rate=inf"),
    (dict(learning_rate="0.1"), TypeError,
     f"Argument `learning_rate` must be {LR_TYPES}. "
     "Received: learning_rate='0.1' (of type str)"),
    (dict(learning_rate=True), TypeError,
     f"Argument `learning_rate` must be {LR_TYPES}. "
     "Received: learning_rate=True (of type bool)"),
    (dict(beta_1=1.0), ValueError,
     "Argument `beta_1` must be in [0, 1). Received: beta_1=1.0"),
    (dict(beta_1=-0.1), ValueError,
     "Argument `beta_1` must be in [0, 1). Received: beta_1=-0.1"),
    (dict(beta_2=1.5), ValueError,
     "Argument `beta_2` must be in [0, 1). Received: beta_2=1.5"),
    (dict(beta_2=float("nan")), ValueError,
     "Argument `beta_2` must be finite. Received: beta_2=nan"),
    (dict(beta_1="0.9"), TypeError,
     "Argument `beta_1` must be a float. Received: beta_1='0.9' "
     "(of type str)"),
    (dict(epsilon=0), ValueError,
     "Argument `epsilon` must be > 0. Received: epsilon=0"),
    (dict(epsilon=-1e-8), ValueError,
     "Argument `epsilon` must be > 0. Received: epsilon=-1e-08"),
    (dict(epsilon=float("inf")), ValueError,
     "Argument `epsilon` must be finite. Received: epsilon=inf"),
    (dict(epsilon=None), TypeError,
     "Argument `epsilon` must be a float. Received: epsilon=None "
     "(of type NoneType)"),
    # Was: 'must be one of "float32"', leaving out the default (a user).
    (dict(moment_dtype="int8"), ValueError,
     'Argument `moment_dtype` must be one of None, "float32". '
     "Received: moment_dtype='int8'"),
    (dict(epsilon_mode="Paper"), ValueError,
     'Argument `epsilon_mode` must be one of "paper", "hat". '
     "Received: epsilon_mode='Paper'"),
    (dict(amsgrad="yes"), TypeError,
     "Argument `amsgrad` must be a bool (True or False). "
     "Received: amsgrad='yes' (of type str)"),
    (dict(amsgrad=1), TypeError,
     "Argument `amsgrad` must be a bool (True or False). "
     "Received: amsgrad=1 (of type int)"),
    (dict(adamax="True"), TypeError,
     "Argument `adamax` must be a bool (True or False). "
     "Received: adamax='True' (of type str)"),
    (dict(nesterov=0), TypeError,
     "Argument `nesterov` must be a bool (True or False). "
     "Received: nesterov=0 (of type int)"),
    (dict(adamax=True, amsgrad=True), ValueError,
     "Arguments `adamax` and `amsgrad` cannot both be True: AdaMax's u = "
     "max(beta_2 * u, |g|) is already a running maximum. Received: "
     "adamax=True, amsgrad=True"),
    (dict(bias_correction=None), TypeError,
     "Argument `bias_correction` must be a bool (True or False). "
     "Received: bias_correction=None (of type NoneType)"),
    (dict(weight_decay=-0.01), ValueError,
     "Argument `weight_decay` must be >= 0. Received: weight_decay=-0.01"),
    (dict(weight_decay=float("nan")), ValueError,
     "Argument `weight_decay` must be finite. Received: weight_decay=nan"),
    (dict(state_format="int4"), ValueError,
     'Argument `state_format` must be one of "native", "8bit", "4bit". '
     "Received: state_format='int4'"),
    (dict(state_format="4bit", lazy_sparse=True), ValueError,
     "Argument `state_format` '4bit' cannot combine with `lazy_sparse=True` "
     "yet (sparse rows would need their blocks decoded and encoded whole). "
     "Received: state_format='4bit', lazy_sparse=True"),
    (dict(weight_decay_mode="adamw"), ValueError,
     'Argument `weight_decay_mode` must be one of "decoupled", '
     '"decoupled_unscaled", "l2". Received: weight_decay_mode=\'adamw\''),
    (dict(weight_decay_exclude="bias["), ValueError,
     "Argument `weight_decay_exclude` holds an invalid regular expression "
     "'bias[' (unterminated character set at position 4). "
     "Received: weight_decay_exclude=['bias[']"),
    (dict(weight_decay_exclude=[1]), TypeError,
     "Argument `weight_decay_exclude` must be None, a string or a list of "
     "strings (regular expressions). Received: weight_decay_exclude=[1]"),
    (dict(clipnorm=0), ValueError,
     "Argument `clipnorm` must be > 0. Received: clipnorm=0"),
    (dict(clipvalue=-1.0), ValueError,
     "Argument `clipvalue` must be > 0. Received: clipvalue=-1.0"),
    (dict(global_clipnorm=float("inf")), ValueError,
     "Argument `global_clipnorm` must be finite. "
     "Received: global_clipnorm=inf"),
    (dict(clipnorm=1.0, clipvalue=1.0), ValueError,
     "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
     "Received: clipnorm=1.0, clipvalue=1.0, global_clipnorm=None"),
    (dict(use_ema="true"), TypeError,
     "Argument `use_ema` must be a bool (True or False). "
     "Received: use_ema='true' (of type str)"),
    (dict(ema_momentum=1.5), ValueError,
     "Argument `ema_momentum` must be in [0, 1]. Received: ema_momentum=1.5"),
    (dict(ema_overwrite_frequency=0), ValueError,
     "Argument `ema_overwrite_frequency` must be an integer >= 1. "
     "Received: ema_overwrite_frequency=0"),
    (dict(ema_overwrite_frequency=1.5), TypeError,
     "Argument `ema_overwrite_frequency` must be an integer or None. "
     "Received: ema_overwrite_frequency=1.5 (of type float)"),
    (dict(loss_scale_factor=0.0), ValueError,
     "Argument `loss_scale_factor` must be > 0. "
     "Received: loss_scale_factor=0.0"),
    (dict(gradient_accumulation_steps=0), ValueError,
     "Argument `gradient_accumulation_steps` must be an integer >= 1. "
     "Received: gradient_accumulation_steps=0"),
    (dict(gradient_accumulation_steps=2.0), TypeError,
     "Argument `gradient_accumulation_steps` must be an integer or None. "
     "Received: gradient_accumulation_steps=2.0 (of type float)"),
    (dict(name=3), TypeError,
     "Argument `name` must be a non-empty string or None. Received: name=3"),
    (dict(bogus=1), ValueError, "Argument(s) not recognized: {'bogus': 1}"),
]


@pytest.mark.parametrize(
    "kwargs, error, message", INVALID,
    ids=[",".join(case[0]) + f"={list(case[0].values())[-1]!r}"
         for case in INVALID],
)
def test_invalid_argument_raises_with_pinned_message(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        AdamPlus(**kwargs)


def test_natural_inputs_are_converted():
    opt = AdamPlus(learning_rate=1, beta_1=np.float64(0.8), beta_2=0,
                   epsilon=np.float32(1e-6), amsgrad=np.bool_(True),
                   weight_decay=np.int64(0), weight_decay_exclude="bias",
                   gradient_accumulation_steps=np.int32(1))
    config = opt.get_config()
    json.dumps(config)
    assert config["learning_rate"] == 1.0
    assert config["beta_1"] == 0.8 and type(config["beta_1"]) is float
    assert config["beta_2"] == 0.0
    assert config["amsgrad"] is True
    assert config["weight_decay_exclude"] == ["bias"]
    assert config["gradient_accumulation_steps"] is None


def test_schedules_and_callables_are_accepted():
    schedule = keras.optimizers.schedules.CosineDecay(0.1, 100)
    assert AdamPlus(learning_rate=schedule).get_config()["learning_rate"]
    AdamPlus(learning_rate=lambda: 0.01)


def test_learning_rate_overflowing_float_names_the_argument():
    # Was: a bare OverflowError ("int too large to convert to float").
    with pytest.raises(ValueError, match=(
        r"^Argument `learning_rate` must be finite\. Received: "
        r"learning_rate=1000000000000000000000000000000000000000\.\.\."
        r"00000000000000000000$"
    )):
        AdamPlus(learning_rate=10**400)


def step_fn(step):
    return 0.01


def no_arg_fn():
    return 0.01


@pytest.mark.parametrize("name, value, want", [
    ("learning_rate", step_fn,
     r"Argument `learning_rate` must be a callable taking no arguments "
     r"\(Keras calls it with none; `beta_1`, `beta_2` and `weight_decay` "
     r"callables take the step\)\. Received: learning_rate=<function "
     r"step_fn at .*> with signature \(step\)"),
    ("weight_decay", no_arg_fn,
     r"Argument `weight_decay` must be a callable taking the step \(one "
     r"argument; `learning_rate` callables take none\)\. Received: "
     r"weight_decay=<function no_arg_fn at .*> with signature \(\)"),
    ("beta_1", no_arg_fn,
     r"Argument `beta_1` must be a callable taking the step"),
])
def test_callables_of_the_wrong_arity_are_refused_at_construction(
        name, value, want):
    # Was: a one-argument learning rate failed only at the first step.
    with pytest.raises(TypeError, match=want):
        AdamPlus(**{name: value})
    # Those that fit are accepted, *args too.
    AdamPlus(learning_rate=no_arg_fn, weight_decay=step_fn, beta_1=step_fn)
    AdamPlus(learning_rate=lambda *args: 0.01)
