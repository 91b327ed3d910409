"""TensorFlow backend: lazy Adam steps for `tf.IndexedSlices` gradients.

With `AdamPlus(lazy_sparse=True)`, an embedding's sparse gradient updates
only the rows it touches: those rows of theta, m and v (and v_max) change,
every other row keeps its value and its moments (TF Addons' LazyAdam
semantics). Duplicate indices are summed first, as a dense gradient would
sum them. The bias correction uses the global step t. Weight decay, in
every mode, applies to the touched rows only.
"""

import tensorflow as tf

from keras_adam_plus import rule


def _tf_variable(variable):
    # A Keras variable wraps a tf.Variable; TF's optimizer passes either.
    return getattr(variable, "_value", variable)


def handles(optimizer, gradient):
    """Whether this path applies to `gradient` (a TF sparse gradient)."""
    return optimizer.lazy_sparse and isinstance(gradient, tf.IndexedSlices)


def update_step(optimizer, gradient, variable, learning_rate):
    """The lazy step of one variable; see the module docstring.

    The same rule as the dense step (`keras_adam_plus.rule`), on the
    gathered rows, in the compute dtype; rows are rounded to the
    variables' dtype when scattered back.
    """
    index = optimizer._get_variable_index(variable)
    dtype = rule.compute_dtype(variable.dtype)
    hyper = optimizer._hyper()
    s = optimizer._step_scalars(dtype, learning_rate)
    unique, position = tf.unique(gradient.indices)
    g = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype),
                                     position, tf.shape(unique)[0])
    var = _tf_variable(variable)
    m_var = _tf_variable(optimizer._momentums[index])
    v_var = _tf_variable(optimizer._velocities[index])

    def gather(slot):
        return tf.cast(tf.gather(slot, unique), dtype)

    def scatter(slot, rows):
        rows = tf.cast(rows, slot.dtype)
        if optimizer._finite is not None:  # skip_nonfinite, traced step
            rows = tf.where(optimizer._finite, rows, tf.gather(slot, unique))
        slot.scatter_update(tf.IndexedSlices(rows, unique))

    theta = gather(var)
    if optimizer._decays[index]:
        g, decrement = rule.decay(hyper, s, theta, g)
        if decrement is not None:
            theta = theta - decrement
    m, v = gather(m_var), gather(v_var)
    m = m + rule.first_moment_increment(s, g, m)
    v = v + rule.second_moment_increment(s, g, v)
    scatter(m_var, m)
    scatter(v_var, v)
    if optimizer.amsgrad:
        v_max_var = _tf_variable(optimizer._velocity_maxes[index])
        v = rule.maximum(gather(v_max_var), v)
        scatter(v_max_var, v)
    scatter(var, theta - rule.direction(hyper, s, g, m, v))
