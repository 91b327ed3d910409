"""JAX backend: small variables share flat m and v slots, one update each.

Opt-in: `AdamPlus(group_small_variables=True)`. XLA runs a per-variable
Adam as three fusions per variable (m, v, theta), each its own kernel with
a fixed cost (microseconds on a CPU thread, a launch on a GPU): with many
small variables (biases, normalization scales) that cost, not memory
traffic, is the step. Here variables of at most `MAX_SIZE` elements with
the same dtype and weight decay form a group that keeps one flat slot per
kind (m, v, v_max): the moments of the whole group are two fusions, theta
one per variable, and the step's state has one array per group instead of
one per variable and kind.

Why opt-in: Keras's JAX trainer carries `optimizer.variables` through the
jitted step, so flat slots are what those variables must be, and what
Keras routes that match optimizer variables by path or count see:
`model.get_state_tree()`/`set_state_tree()` (and Orbax through it) and
`LossScaleOptimizer`'s saved copy carry a grouped state only into an
optimizer grouped the same way. Files (`.keras`, `.weights.h5`, pickle)
and `get_weights`/`set_weights` keep the per-variable layout
(`storage.Store.entries`) and load across layouts and backends. Keeping
per-variable slots and concatenating them inside the step measured slower
than no groups (see the benchmark), so the default is per-variable slots.

Larger variables keep their own slots: on a CPU, concatenating their
gradients costs more than the kernels it saves (measured crossover about
8k-16k elements; see the docs' speed page). No groups are made under a
`keras.distribution` (slots follow their variable's sharding), for
subclasses that override `update_step`, or for variables Keras overwrites
with their gradient. A step that updates only part of a group (gradients
filtered out) updates those variables one at a time, on their parts of
the flat slots (in place under `jit`; run eagerly, each such write copies
the flat slot).
"""

import keras

from keras_adam_plus import storage

# Variables of at most this many elements are grouped (XLA on a CPU: a
# flat update is ~0.6x the time of per-variable ones at 1k-4k elements,
# ~1.3x at 16k).
MAX_SIZE = 8192


def groups(var_list, keys, max_size):
    """Lists of positions in `var_list` that share flat slots (maybe none).

    Decided once, at build, from the variables and a key per variable that
    its group mates share (whether weight decay applies to it, and its
    `variable_groups` group); `max_size` 0 makes none.
    """
    if keras.backend.backend() != "jax" or not max_size:
        return ()
    if keras.distribution.distribution() is not None:
        return ()
    found = {}
    for i, var in enumerate(var_list):
        size = storage.size(var.shape)
        if (getattr(var, "overwrite_with_gradient", False)
                or getattr(var, "_layout", None) is not None
                or not 0 < size <= max_size):
            continue
        key = (storage.dtype_of(var), keys[i])
        found.setdefault(key, []).append(i)
    return tuple(tuple(m) for m in found.values() if len(m) > 1)


def fallback_reason(plan, variables, store):
    """None where the plan has groups, else why not."""
    if not plan.groups:
        return "no group of small variables"
    return None


def describe(plan):
    """`AdamPlus.fast_path` on JAX."""
    if not plan.groups:
        return "generic"
    count = sum(len(g) for g in plan.groups)
    n = len(plan.groups)
    return (f"jax_grouped ({count} variables in {n} group"
            f"{'' if n == 1 else 's'}, the rest per variable)")


def _split(step, variables):
    """`(complete, rest)`: groups by position in `variables`, the others.

    `complete` holds, per group all of whose variables are in this step,
    their positions in `variables` in the group's (flat slots') order.
    """
    def compute():
        index_of = {}
        for position, variable in enumerate(variables):
            index_of[step.index(variable)] = position
        complete, grouped = [], set()
        for members in step.plan.groups:
            if all(i in index_of for i in members):
                complete.append([index_of[i] for i in members])
                grouped.update(complete[-1])
        rest = [p for p in range(len(variables)) if p not in grouped]
        return complete, rest

    return storage.per_variables(step.store.cache, "jax_groups", variables,
                                 compute)


def update(step, grads, variables):
    """One AdamPlus step: flat per group, one variable at a time else."""
    complete, rest = _split(step, variables)
    store = step.store
    for positions in complete:
        index = step.index(variables[positions[0]])
        step.run([grads[p] for p in positions],
                 [variables[p] for p in positions], store.flat_slots(index),
                 index)
    for p in rest:
        index = step.index(variables[p])
        step.run([grads[p]], [variables[p]], store.slots(index), index)
