"""Schedules from the Adam paper, serializable like Keras's own."""

import keras
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
