"""Skipping steps whose gradients hold a NaN or an Inf (`skip_nonfinite`).

The decision is taken once per step, on every replica's gradients, and the
step is then taken or not as a whole; nothing is copied:

- eager (any backend): a Python branch on the flag;
- traced TensorFlow (`tf.function`, XLA): `ops.cond`, as Keras's
  `LossScaleOptimizer` does, in cross-replica context under a
  `tf.distribute` strategy (the flag AND-ed over the replicas, so that
  every replica skips together);
- `stateless_apply` (JAX's trainer, jitted): `ops.cond` between the step
  and the inputs (a select per value measured 4x the step on XLA CPU: the
  selects did not fuse into the update);
- torch under `torch.compile`: a select per value (inductor fuses it).

A skipped step leaves every variable (weights, moments, averages, EMA,
accumulators, the step count) exactly as it was and adds 1 to
`skipped_steps`.
"""

import contextlib

import keras
from keras import ops


def all_finite(grads):
    """A scalar bool tensor: no gradient holds a NaN or an Inf."""
    values = []
    for grad in grads:
        if grad is None:
            continue
        # tf.IndexedSlices: its values (torch tensors have a .values too).
        values.append(grad.values if type(grad).__name__ == "IndexedSlices"
                      else grad)
    if not values:
        return ops.convert_to_tensor(True)
    if keras.backend.backend() == "torch":
        return _torch_all_finite(values)
    return ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in values]))


def _torch_all_finite(values):
    # One fused multi-tensor L2 norm per (device, dtype): a single read of
    # each gradient, no boolean tensor written; a NaN or Inf makes it
    # non-finite. Only where a norm is not finite (a NaN, an Inf, or an
    # overflow of the sum of squares) is each gradient checked exactly.
    import torch

    def exact():
        return torch.stack([torch.isfinite(v).all() for v in values]).all()

    if torch.compiler.is_compiling():
        return exact()  # inductor fuses it
    groups = {}
    for value in values:
        groups.setdefault((value.device, value.dtype), []).append(value)
    norms = []
    for group in groups.values():
        norms.extend(n.float() for n in torch._foreach_norm(group))
    finite = torch.isfinite(torch.stack(norms)).all()
    return finite if bool(finite) else exact()


def _concrete(flag):
    """Whether `flag` has a value now (not traced or compiled)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(flag, jax.core.Tracer)
    import torch

    return not torch.compiler.is_compiling()


def apply(optimizer, apply_fn, grads):
    """Runs `apply_fn(grads)` (the step) only if `grads` are finite."""
    skipped = optimizer._skipped_steps

    def skip():
        skipped.assign_add(ops.ones((), skipped.dtype))

    if keras.backend.backend() == "tensorflow" and _tf_cross_replica(
            optimizer, apply_fn, grads, skip):
        return
    finite = all_finite(grads)
    if _concrete(finite):
        if bool(finite):
            apply_fn(grads)
        else:
            skip()
        return
    if keras.backend.backend() == "tensorflow":
        ops.cond(finite, lambda: apply_fn(grads), skip)
        return
    # Traced JAX or compiled torch: select, fused into the update.
    variables = [v for v in optimizer._trainable_variables
                 + list(optimizer.variables) if v is not skipped]
    old = [v.value for v in variables]
    apply_fn(grads)
    for variable, value in zip(variables, old):
        variable.assign(ops.where(finite, variable.value, value))
    skipped.assign_add(ops.cast(ops.logical_not(finite), skipped.dtype))


def _tf_cross_replica(optimizer, apply_fn, grads, skip):
    """Under a tf.distribute strategy: decide over all replicas at once.

    Returns whether it handled the step. Each replica's `apply` reaches a
    merge_call; there the replicas' flags are AND-ed and one `cond` (in
    cross-replica context, where a branch may call merge_call itself, as
    the step does) runs the step on every replica or on none.
    """
    import tensorflow as tf

    if not tf.distribute.has_strategy() or (
            tf.distribute.in_cross_replica_context()):
        return False
    context = tf.distribute.get_replica_context()
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        # One replica per worker without merge_call: all-reduce the flag.
        bad = context.all_reduce(
            "sum", tf.cast(tf.logical_not(all_finite(grads)), tf.float32))
        ops.cond(tf.equal(bad, 0.0), apply_fn, skip)
        return True

    def cross_replica(strategy, grads):
        flags = strategy.experimental_local_results(
            strategy.extended.call_for_each_replica(all_finite,
                                                    args=(grads,)))
        finite = tf.reduce_all(tf.stack([tf.identity(f) for f in flags]))

        def step():
            strategy.extended.call_for_each_replica(apply_fn, args=(grads,))

        ops.cond(finite, step, skip)

    context.merge_call(cross_replica, args=(grads,))
    return True


@contextlib.contextmanager
def bypassed(optimizer):
    """Inside, `optimizer.apply` takes the step without the check."""
    optimizer._skip_bypass = True
    try:
        yield
    finally:
        optimizer._skip_bypass = False


def stateless_apply(optimizer, stateless_fn, optimizer_variables, grads,
                    trainable_variables):
    """`stateless_fn` (the step) under `ops.cond` on the step's flag.

    The skipped branch returns the inputs, `skipped_steps` plus one.
    """
    finite = all_finite(grads)
    skipped = [v is optimizer._skipped_steps for v in optimizer.variables]

    def step():
        with bypassed(optimizer):
            new_trainable, new_state = stateless_fn()
        return list(new_trainable), list(new_state)

    def skip():
        state = [ops.add(old, ops.ones((), old.dtype)) if is_count
                 else old
                 for is_count, old in zip(skipped, optimizer_variables)]
        return list(trainable_variables), state

    return ops.cond(finite, step, skip)
