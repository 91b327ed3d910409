"""Skipping steps whose gradients hold a NaN or an Inf (`skip_nonfinite`).

The decision is taken once per step, on every replica's gradients, and the
step is then taken or not as a whole:

- eager (any backend): a Python branch on the flag;
- `tf.function`: `ops.cond`, as Keras's `LossScaleOptimizer` does, in
  cross-replica context under a `tf.distribute` strategy (the flag AND-ed
  over the replicas, so that every replica skips together);
- traced or compiled steps (TensorFlow under XLA, `stateless_apply`
  under `jax.jit`, `torch.compile`): the step runs with its writes
  guarded: each `assign` of AdamPlus (theta, m, v, v_max, averages, beta
  products) writes `where(finite, new, old)`, which XLA fuses into the
  update's own pass, so nothing is copied. Only what Keras writes itself
  (the step count, EMA weights, gradient accumulators, a constrained
  weight) is kept in a copy and selected after the step. (A cond around
  the step measured 2-4.6x the step under XLA, and a select against a
  copy of every value 2-4x.)

The remaining cost is the pass that reads every gradient to decide: at
least 4 bytes per parameter against the step's 28 (1.14x), more where a
backend's reductions run below its streaming bandwidth. See the README
for the measured ratios.

A skipped step leaves every variable (weights, moments, averages, EMA,
accumulators, the step count) exactly as it was and adds 1 to
`skipped_steps`.
"""

import contextlib

import keras
from keras import ops

from keras_adam_plus import storage


def all_finite(grads):
    """A scalar bool tensor: no gradient holds a NaN or an Inf.

    One read of each gradient: the sum of all gradients (half precision
    summed in float32) is finite unless a value is NaN or Inf or the sum
    overflows; only then is each gradient checked exactly (a branch, or
    `ops.cond` when traced). A plain `all(isfinite(g))` measured twice the
    time of the sum on XLA CPU (a boolean reduction), and the sum runs at
    about the streaming rate.
    """
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

    def exact():
        return ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in values]))

    sums = []
    for value in values:
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype != "float64":
            value = ops.cast(value, "float32")  # fused into the reduction
        sums.append(ops.cast(ops.sum(value), "float64" if dtype == "float64"
                             else "float32"))
    total = sums[0] if len(sums) == 1 else ops.sum(ops.stack(
        [ops.cast(x, "float32") for x in sums]))
    fast = ops.isfinite(total)
    if _concrete(fast):
        return fast if bool(fast) else exact()
    return ops.cond(fast, lambda: ops.convert_to_tensor(True), exact)


# Groups of at least this many tensors are checked by torch's multi-tensor
# non-finite check (the kernel of its GradScaler): for 1000 tensors of 1k
# it measured 7x faster than a sum per tensor; for one tensor, slower.
_FOREACH_MIN = 16


def _torch_all_finite(values):
    # Per (device, dtype) group, one read of each gradient: torch's
    # multi-tensor non-finite check (exact; it writes each gradient back
    # multiplied by 1, bit-identical for float32, float16 and float64, so
    # it is used only on contiguous tensors outside autograd), or the sum
    # of the group (non-finite also on an overflow: then each gradient is
    # checked exactly).
    import torch

    device = values[0].device  # flags gathered there (several devices)

    def exact():
        return torch.stack([torch.isfinite(v).all().to(device)
                            for v in values]).all()

    if torch.compiler.is_compiling():
        return exact()  # inductor fuses it
    groups = {}
    for value in values:
        groups.setdefault((value.device, value.dtype), []).append(value)
    flags = []
    for (device, dtype), group in groups.items():
        if len(group) >= _FOREACH_MIN and dtype in (
                torch.float32, torch.float16, torch.float64) and all(
                g.is_contiguous() and not g.requires_grad for g in group):
            found = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found, torch.ones((), device=device))
            flags.append(found == 0)
        else:
            accumulate = torch.float64 if dtype == torch.float64 else (
                torch.float32)
            flags.append(torch.isfinite(torch.stack(
                [g.sum(dtype=accumulate) for g in group]).sum()))
    finite = flags[0] if len(flags) == 1 else torch.stack(
        [f.to(device) for f in flags]).all()
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


def in_xla():
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`).

    There a cond around the step measured 2-4.6x the step (XLA copies the
    state into the conditional): the step's writes are guarded instead;
    and a large low-bit variable steps through a loop (`tf_chunked`).
    TF has no public test; this uses its own (tensorflow.python), False if
    absent or renamed.
    """
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):  # pragma: no cover
        return False


class Skip:
    """What the skip is given: the store and the variables of the step.

    Args:
        store: The optimizer's `storage.Store` (its `skipped` counter, its
            guard flag, and the variables written through it).
        model: The model variables the optimizer was built with.
        own: The optimizer's `variables`.
        theta_by_keras: Whether Keras writes theta itself after the step
            (EMA overwriting it), so that theta is not guarded.
    """

    def __init__(self, store, model, own, theta_by_keras):
        self.store, self.model, self.own = store, list(model), list(own)
        self.theta_by_keras = theta_by_keras

    def unguarded(self):
        """The variables a step may write other than through the store.

        The store writes theta, the slots, averages and beta products
        (guarded). Keras writes the step count, EMA weights and gradient
        accumulators itself, and the constraint of a trainable variable,
        after the step: those are kept in a copy and selected afterwards
        (scalars, or full-size only where EMA, accumulation or a
        constraint is used).
        """
        store = self.store

        def compute():
            guarded = {id(v) for v in store.written()}
            if not self.theta_by_keras:
                # Keras assigns a variable with `overwrite_with_gradient`
                # (float8 scales) its gradient itself.
                guarded |= {id(v) for v in self.model if not getattr(
                    v, "overwrite_with_gradient", False)}
            return [v for v in self.model + self.own
                    if v is not store.skipped and (
                        id(v) not in guarded
                        or getattr(v, "constraint", None) is not None)]

        # ~1.5 ms of Python a step with 1000 variables, hence cached.
        return storage.per_variables(
            store.cache, "unguarded", self.model + self.own, compute,
            extra=(self.theta_by_keras, tuple(
                getattr(v, "constraint", None) is not None
                for v in self.model)))


def apply(skip, apply_fn, grads):
    """Runs `apply_fn(grads)` (the step) only if `grads` are finite."""
    skipped = skip.store.skipped

    def count():
        skipped.assign_add(ops.ones((), skipped.dtype))

    def step(step_grads):
        with checked(skip.store):
            apply_fn(step_grads)

    if keras.backend.backend() == "tensorflow" and _tf_cross_replica(
            step, grads, count):
        return
    finite = all_finite(grads)
    if _concrete(finite):
        if bool(finite):
            step(grads)
        else:
            count()
        return
    if keras.backend.backend() == "tensorflow" and not in_xla():
        ops.cond(finite, lambda: step(grads), count)
        return
    # TF under XLA, traced JAX, compiled torch: every write of the step
    # selects its old value on a bad step (`guarded`), in the same pass.
    with guarded(skip, finite) as finish:
        step(grads)
    finish(finite)


def _tf_cross_replica(apply_fn, grads, skip):
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
        # Strategies that update without merge_call (e.g. MirroredStrategy
        # under XLA on GPUs): all-reduce the flag in the replica context.
        bad = context.all_reduce(
            "sum", tf.cast(tf.logical_not(all_finite(grads)), tf.float32))
        ops.cond(tf.equal(bad, 0.0), lambda: apply_fn(grads), skip)
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
def guarded(skip, finite):
    """Inside, the store's writes keep the old value unless `finite`.

    Yields `finish(finite)`, to call after the step: it selects the
    unguarded variables (see `Skip.unguarded`) and counts a skip.
    """
    store = skip.store
    rest = skip.unguarded()
    # Values before the step (TF: a read ordered before the step's writes).
    old = [ops.copy(v.value) for v in rest]

    def finish(finite):
        for variable, value in zip(rest, old):
            variable.assign(ops.where(finite, variable.value, value))
        skipped = store.skipped
        skipped.assign_add(ops.cast(ops.logical_not(finite), skipped.dtype))

    store.finite = finite
    try:
        yield finish
    finally:
        store.finite = None


@contextlib.contextmanager
def checked(store):
    """Inside, the gradients are checked: `apply` takes the step as is.

    (Keras's `stateless_apply` and `LossScaleOptimizer` call `apply`
    inside the step the skip already wraps.)
    """
    store.checked = True
    try:
        yield
    finally:
        store.checked = False


def stateless_apply(skip, stateless_fn, optimizer_variables, grads,
                    trainable_variables):
    """`stateless_fn` (the step) with its writes guarded by the flag.

    On a bad step every returned value is its input, `skipped_steps` plus
    one; the selects are part of the step's own fusions (no copy).
    """
    finite = all_finite(grads)
    # Keras's LossScaleOptimizer passes the inner optimizer's Variables as
    # `optimizer_variables`: their values (the scope's, when in one).
    optimizer_variables = [ops.convert_to_tensor(x)
                           for x in optimizer_variables]
    trainable_variables = [ops.convert_to_tensor(x)
                           for x in trainable_variables]
    store = skip.store
    if _concrete(finite):  # eager torch: a Python branch
        if bool(finite):
            with checked(store):
                return stateless_fn()
        return list(trainable_variables), [
            ops.add(old, ops.ones((), old.dtype))
            if v is store.skipped else old
            for v, old in zip(skip.own, optimizer_variables)]
    rest = {id(v) for v in skip.unguarded()}
    store.finite = finite
    try:
        with checked(store):
            new_trainable, new_state = stateless_fn()
    finally:
        store.finite = None
    trainable = [
        ops.where(finite, new, old) if id(v) in rest else new
        for v, new, old in zip(skip.model, new_trainable,
                               trainable_variables)]
    state = []
    for v, new, old in zip(skip.own, new_state, optimizer_variables):
        if v is store.skipped:
            new = ops.add(old, ops.cast(ops.logical_not(finite), old.dtype))
        elif id(v) in rest:
            new = ops.where(finite, new, old)
        state.append(new)
    return trainable, state
