"""The paper's temporal average of the weights (Section 7.2).

theta_bar_t = b * theta_bar_{t-1} + (1 - b) * theta_t, theta_bar_0 = 0,
once per real step; bias-corrected as theta_bar_t / (1 - b**t).
"""

from keras import ops

from keras_adam_plus import rule

SLOT = "temporal_average"


def update(optimizer, averages, variables):
    """One averaging step of `variables` into their `averages` slots."""
    decay = optimizer.average_decay
    for variable in variables:
        average = averages[optimizer._get_variable_index(variable)]
        dtype = rule.compute_dtype(average.dtype)
        theta = ops.cast(variable, dtype)
        new = ops.add(
            ops.multiply(ops.cast(average, dtype), rule.constant(decay, dtype)),
            ops.multiply(theta, rule.constant(1.0 - decay, dtype)),
        )
        optimizer.assign(average, ops.cast(new, average.dtype))


def corrected(optimizer, averages, variables):
    """theta_bar / (1 - b**t) per variable; before any step, theta."""
    result = []
    for variable in variables:
        average = averages[optimizer._get_variable_index(variable)]
        dtype = rule.compute_dtype(average.dtype)
        t = ops.cast(optimizer.iterations, dtype)
        correction = rule.constant(1.0, dtype) - ops.power(
            rule.constant(optimizer.average_decay, dtype), t)
        value = ops.divide(
            ops.cast(average, dtype),
            rule.maximum(correction, rule.constant(1e-30, dtype)))
        result.append(ops.where(
            ops.greater(t, rule.constant(0.0, dtype)),
            ops.cast(value, variable.dtype), ops.convert_to_tensor(variable)))
    return result


class Swap:
    """Swaps averaged weights in on enter and the trained ones back on exit."""

    def __init__(self, optimizer, var_list):
        self.optimizer = optimizer
        self.variables = (optimizer._trainable_variables if var_list is None
                          else list(var_list))

    def __enter__(self):
        averages = self.optimizer.average_weights(self.variables)
        self.saved = [ops.copy(ops.convert_to_tensor(v))
                      for v in self.variables]
        for variable, value in zip(self.variables, averages):
            variable.assign(value)
        return self.variables

    def __exit__(self, *exc):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)
        return False
