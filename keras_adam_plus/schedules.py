"""Schedules from the Adam paper, serializable like Keras's own."""

import math

import keras
import numpy as np
from keras import ops

from keras_adam_plus import validation


@keras.saving.register_keras_serializable(package="keras_adam_plus")
class InverseSqrtDecay(keras.optimizers.schedules.LearningRateSchedule):
    """alpha_t = alpha / sqrt(t), t = step + 1 (the paper's Section 4, 6.1).

    Used by the paper's logistic-regression experiments and its convergence
    analysis (Theorem 4.1).

    Args:
        initial_learning_rate: alpha, a float >= 0.

    Example:

    >>> from keras_adam_plus import AdamPlus, InverseSqrtDecay
    >>> optimizer = AdamPlus(learning_rate=InverseSqrtDecay(0.01))
    """

    def __init__(self, initial_learning_rate):
        self.initial_learning_rate = validation.check_float(
            "initial_learning_rate", initial_learning_rate, low=0.0
        )

    def __call__(self, step):
        t = ops.cast(step, "float32") + 1.0
        return self.initial_learning_rate / ops.sqrt(t)

    def get_config(self):
        """Returns the config: `{"initial_learning_rate": alpha}`."""
        return {"initial_learning_rate": self.initial_learning_rate}


@keras.saving.register_keras_serializable(package="keras_adam_plus")
class BetaDecay(keras.optimizers.schedules.LearningRateSchedule):
    """beta_t = beta * lambda**(t - 1), t = step + 1 (the paper's Thm 4.1).

    The decaying first-moment rate of the paper's convergence analysis
    (Theorem 4.1 assumes beta_{1,t} = beta_1 lambda^{t-1}, lambda in (0, 1)).
    Pass it as `beta_1` (or `beta_2`) of `AdamPlus`; the bias correction
    then uses the product of the betas actually applied.

    Args:
        initial_beta: beta at the first step, a float in [0, 1).
            Defaults to `0.9`.
        decay: lambda, a float in (0, 1]. Defaults to `1 - 1e-8`, the
            paper's.

    Example:

    >>> from keras_adam_plus import AdamPlus, BetaDecay
    >>> optimizer = AdamPlus(beta_1=BetaDecay(0.9, 1 - 1e-8))
    """

    def __init__(self, initial_beta=0.9, decay=1 - 1e-8):
        self.initial_beta = validation.check_float(
            "initial_beta", initial_beta, low=0.0, high=1.0,
            high_inclusive=False,
        )
        self.decay = validation.check_float(
            "decay", decay, low=0.0, high=1.0, low_inclusive=False
        )

    def __call__(self, step):
        # lambda**step as exp(step * log(lambda)), log taken in float64:
        # in float32, 1 - 1e-8 is 1 and lambda**step would be constant.
        step = ops.cast(step, "float32")
        log_decay = ops.convert_to_tensor(
            np.float32(math.log(self.decay)))
        return self.initial_beta * ops.exp(step * log_decay)

    def get_config(self):
        """Returns the config: `{"initial_beta": ..., "decay": ...}`."""
        return {"initial_beta": self.initial_beta, "decay": self.decay}


# AdamPlus's arguments that may hold a schedule.
SCHEDULED = ("beta_1", "beta_2", "weight_decay")


def serialize(value):
    """A config value: a `LearningRateSchedule` serialized, else as is."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    if isinstance(value, (list, tuple)):  # of patterns, or of rules
        return [dict(v) if isinstance(v, dict) else v for v in value]
    return value  # a float, or a plain callable (not JSON, as in Keras)


def deserialize_config(config, custom_objects=None):
    """A copy of `config` with its serialized schedules rebuilt."""
    config = dict(config)
    for name in SCHEDULED:
        if isinstance(config.get(name), dict):
            config[name] = keras.saving.deserialize_keras_object(
                config[name], custom_objects=custom_objects)
    return config
