"""TensorFlow backend: lazy Adam steps for `tf.IndexedSlices` gradients.

With `AdamPlus(lazy_sparse=True)`, an embedding's sparse gradient updates
only the rows it touches: those rows of theta, m and v (and v_max) change,
every other row keeps its value and its moments (TF Addons' LazyAdam
semantics). Duplicate indices are summed first, as a dense gradient would
sum them. The bias correction uses the global step t. Weight decay, in
every mode, applies to the touched rows only.
"""

import tensorflow as tf


def _tf_variable(variable):
    # A Keras variable wraps a tf.Variable; TF's optimizer passes either.
    return getattr(variable, "_value", variable)


def handles(optimizer, gradient):
    """Whether this path applies to `gradient` (a TF sparse gradient)."""
    return optimizer.lazy_sparse and isinstance(gradient, tf.IndexedSlices)


def update_step(optimizer, gradient, variable, learning_rate):
    """The lazy step of one variable; see the module docstring."""
    index = optimizer._get_variable_index(variable)
    dtype = variable.dtype
    unique, position = tf.unique(gradient.indices)
    g = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype),
                                     position, tf.shape(unique)[0])
    lr = tf.cast(learning_rate, dtype)
    var = _tf_variable(variable)
    m_var = _tf_variable(optimizer._momentums[index])
    v_var = _tf_variable(optimizer._velocities[index])
    theta = tf.gather(var, unique)
    m = tf.gather(m_var, unique)
    v = tf.gather(v_var, unique)
    beta_1 = tf.cast(optimizer.beta_1, dtype)
    beta_2 = tf.cast(optimizer.beta_2, dtype)
    epsilon = tf.cast(optimizer.epsilon, dtype)

    if optimizer._decays[index]:
        wd = optimizer._weight_decay_now(dtype)
        mode = optimizer.weight_decay_mode
        if mode == "l2":
            g = g + wd * theta
        elif mode == "decoupled":
            theta = theta - theta * wd * lr
        else:
            theta = theta - theta * wd

    m = m + (g - m) * (1 - beta_1)
    v = v + (tf.square(g) - v) * (1 - beta_2)
    m_var.scatter_update(tf.IndexedSlices(m, unique))
    v_var.scatter_update(tf.IndexedSlices(v, unique))
    if optimizer.amsgrad:
        v_max_var = _tf_variable(optimizer._velocity_maxes[index])
        v = tf.maximum(tf.gather(v_max_var, unique), v)
        v_max_var.scatter_update(tf.IndexedSlices(v, unique))

    if optimizer.bias_correction:
        c1, c2, _ = optimizer._corrections(dtype)
        alpha = lr * tf.sqrt(c2) / c1
        if optimizer.epsilon_mode == "paper":
            epsilon = epsilon * tf.sqrt(c2)
    else:
        alpha = lr
    theta = theta - m * alpha / (tf.sqrt(v) + epsilon)
    var.scatter_update(tf.IndexedSlices(theta, unique))
