"""The paper's temporal average of the weights (Section 7.2).

theta_bar_t = b * theta_bar_{t-1} + (1 - b) * theta_t, theta_bar_0 = 0,
once per real step; bias-corrected as theta_bar_t / (1 - b**t).
"""

from keras import ops

from keras_adam_plus import rule


def update(store, variables, index):
    """One averaging step of `variables` into the store's averages."""
    decay = store.plan.average_decay
    for variable in variables:
        average = store.averages[index(variable)]
        dtype = rule.compute_dtype(average.dtype)
        theta = ops.cast(variable, dtype)
        new = ops.add(
            ops.multiply(ops.cast(average, dtype), rule.constant(decay, dtype)),
            ops.multiply(theta, rule.constant(1.0 - decay, dtype)),
        )
        store.assign(average, ops.cast(new, average.dtype))


def corrected(store, decay, iterations, variables, index):
    """theta_bar / (1 - b**t) per variable; before any step, theta.

    `store` None: the optimizer is not built (no step yet): the variables'
    values, or an error without `variables`.
    """
    if decay is None:
        raise ValueError("average_weights() needs AdamPlus(average_decay"
                         "=...). Received: average_decay=None")
    if store is None:
        if not variables:
            raise ValueError("average_weights() of an optimizer not built "
                             "yet needs `var_list`.")
        return [ops.convert_to_tensor(v) for v in variables]
    result = []
    for variable in variables:
        average = store.averages[index(variable)]
        dtype = rule.compute_dtype(average.dtype)
        t = ops.cast(iterations, dtype)
        correction = rule.constant(1.0, dtype) - ops.power(
            rule.constant(store.plan.average_decay, dtype), t)
        value = ops.divide(
            ops.cast(average, dtype),
            rule.maximum(correction, rule.constant(1e-30, dtype)))
        result.append(ops.where(
            ops.greater(t, rule.constant(0.0, dtype)),
            ops.cast(value, variable.dtype), ops.convert_to_tensor(variable)))
    return result


class Swap:
    """Swaps averaged weights in on enter and the trained ones back on exit.

    `averages` is a function of the variables giving their averages
    (`AdamPlus.average_weights`).
    """

    def __init__(self, averages, variables):
        self.averages, self.variables = averages, list(variables)

    def __enter__(self):
        averages = self.averages(self.variables)
        self.saved = [ops.copy(ops.convert_to_tensor(v))
                      for v in self.variables]
        for variable, value in zip(self.variables, averages):
            variable.assign(value)
        return self.variables

    def __exit__(self, *exc):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)
        return False
