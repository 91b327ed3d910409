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


def handles(plan, gradient):
    """Whether this path applies to `gradient` (a TF sparse gradient)."""
    return plan.lazy_sparse and isinstance(gradient, tf.IndexedSlices)


def update_step(step, gradient, variable):
    """The lazy step of one variable; see the module docstring.

    The same rule as the dense step (`keras_adam_plus.rule`), on the
    gathered rows, in the compute dtype; rows are rounded to the
    variables' dtype when scattered back.
    """
    index = step.index(variable)
    dtype = rule.compute_dtype(variable.dtype)
    s = step.scalars(dtype, step.plan.group(index))
    unique, position = tf.unique(gradient.indices)
    g = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype),
                                     position, tf.shape(unique)[0])
    rows = _Rows(step.store, index, unique, _tf_variable(variable), dtype)
    rule.step(step.plan.setting(index).hyper, s, g, rows,
              step.plan.decays[index])
    rows.finish()


class _Rows:
    """`rule.step`'s state over the touched rows (gather, scatter back)."""

    def __init__(self, store, index, rows, var, dtype):
        self.finite, self.rows, self.dtype = store.finite, rows, dtype
        self.format = store.formats[index]
        self.var = var
        self.slots = {k: _tf_variable(v) for k, v in zip(
            ("m", "v", "v_max"), store.slots(index)) if v is not None}
        self.value = self._gather(var)

    def _gather(self, slot, fmt=None):
        rows = tf.gather(slot, self.rows)
        return (fmt.decode(rows, self.dtype) if fmt
                else tf.cast(rows, self.dtype))

    def _scatter(self, slot, values, fmt=None):
        values = (fmt.encode(values, slot.dtype.name) if fmt
                  else tf.cast(values, slot.dtype))
        if self.finite is not None:  # skip_nonfinite, traced step
            values = tf.where(self.finite, values,
                              tf.gather(slot, self.rows))
        slot.scatter_update(tf.IndexedSlices(values, self.rows))

    def theta(self):
        return self.value

    def sub_theta(self, delta):
        # Decay and direction both change theta; written once, at the end
        # (`rule.step` ends with the direction).
        if delta is not None:
            self.value = self.value - delta

    def read(self, kind):
        return self._gather(self.slots[kind], self.format)

    def add(self, kind, old, increment):
        return self.put(kind, old + increment)

    def put(self, kind, new):
        self._scatter(self.slots[kind], new, self.format)
        return new

    def finish(self):
        self._scatter(self.var, self.value)
