"""Skipping steps whose gradients hold a NaN or an Inf (`skip_nonfinite`)."""

from keras import ops


def all_finite(grads):
    """A scalar bool tensor: no gradient holds a NaN or an Inf."""
    flags = []
    for grad in grads:
        if grad is None:
            continue
        # tf.IndexedSlices: its values (torch tensors have a .values too).
        values = (grad.values if type(grad).__name__ == "IndexedSlices"
                  else grad)
        flags.append(ops.all(ops.isfinite(values)))
    if not flags:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(flags))


def apply(optimizer, apply_fn, grads, variables):
    """Runs `apply_fn()` and keeps every state unchanged if not finite."""
    finite = all_finite(grads)
    skipped = optimizer._skipped_steps
    state = [v for v in list(variables) + list(optimizer.variables)
             if v is not skipped]
    saved = [ops.copy(v.value) for v in state]
    apply_fn()
    for variable, old in zip(state, saved):
        variable.assign(ops.where(finite, variable.value, old))
    skipped.assign_add(ops.cast(ops.logical_not(finite), skipped.dtype))
