"""JAX backend: small variables share flat m and v slots, one update each.

XLA runs a per-variable Adam as three fusions per variable (m, v, theta),
each its own kernel with a fixed cost (~4 us on a CPU thread, a launch on
a GPU): with many small variables (biases, normalization scales) that
cost, not memory traffic, is the step. Here variables of at most
`MAX_SIZE` elements with the same dtype and weight decay form a group that
keeps one flat slot per kind (m, v, v_max): the moments of the whole group
are two fusions, theta one per variable, and the step's state has one
array per group instead of one per variable and kind.

Larger variables keep their own slots: on a CPU, concatenating their
gradients costs more than the kernels it saves (measured crossover about
8k-16k elements; see the README). `.keras` and `.weights.h5` files do not
change: the state is saved and loaded in the per-variable layout
(`storage.entries`), and so are `get_weights`/`set_weights`; what Keras
reads from `optimizer.variables` itself (`get_state_tree`, the variables
`LossScaleOptimizer` counts) sees the flat slots.

No groups are made under a `keras.distribution` (slots follow their
variable's sharding), for subclasses that override `update_step`, or for
variables Keras overwrites with their gradient. A step that updates only
part of a group (gradients filtered out) updates those variables through
`update_step`, on their parts of the flat slots (in place under `jit`;
run eagerly, each such write copies the flat slot).
"""

import keras

from keras_adam_plus import storage

# Variables of at most this many elements are grouped (XLA on a CPU: a
# flat update is ~0.6x the time of per-variable ones at 1k-4k elements,
# ~1.3x at 16k). An optimizer's `_group_max_size`, set before build,
# overrides it (0: no groups; tests and the benchmark compare the two).
MAX_SIZE = 8192


def plan(optimizer, var_list):
    """Lists of positions in `var_list` that share flat slots (maybe none).

    Decided once, at build; `optimizer._decays` must be set.
    """
    from keras_adam_plus.adam_plus import AdamPlus

    if keras.backend.backend() != "jax":
        return []
    if type(optimizer).update_step is not AdamPlus.update_step:
        return []
    if keras.distribution.distribution() is not None:
        return []
    max_size = getattr(optimizer, "_group_max_size", MAX_SIZE)
    groups = {}
    for i, var in enumerate(var_list):
        size = storage.size(var.shape)
        if (getattr(var, "overwrite_with_gradient", False)
                or getattr(var, "_layout", None) is not None
                or not 0 < size <= max_size):
            continue
        key = (keras.backend.standardize_dtype(var.dtype),
               optimizer._decays[i])
        groups.setdefault(key, []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def fallback_reason(optimizer):
    """None where this optimizer has groups, else why not."""
    if not getattr(optimizer, "_slot_groups", None):
        return "no group of small variables"
    return None


def describe(optimizer):
    """`AdamPlus.fast_path` on JAX."""
    groups = getattr(optimizer, "_slot_groups", None)
    if not groups:
        return "generic"
    count = sum(len(g) for g in groups)
    return (f"jax_grouped ({count} variables in {len(groups)} groups, "
            "the rest per variable)")


def _split(optimizer, variables):
    """`(complete, rest)`: groups by position in `variables`, the others.

    `complete` holds, per group all of whose variables are in this step,
    their positions in `variables` in the group's (flat slots') order.
    """
    def compute():
        index_of = {}
        for position, variable in enumerate(variables):
            index_of[optimizer._get_variable_index(variable)] = position
        complete, grouped = [], set()
        for members in optimizer._slot_groups:
            if all(i in index_of for i in members):
                complete.append([index_of[i] for i in members])
                grouped.update(complete[-1])
        rest = [p for p in range(len(variables)) if p not in grouped]
        return complete, rest

    return storage.per_variables(optimizer, "_jax_groups", variables,
                                 compute)


def update(optimizer, grads, variables, learning_rate):
    """One AdamPlus step: flat per group, `update_step` for the rest."""
    complete, rest = _split(optimizer, variables)
    for positions in complete:
        _update_group(optimizer, [grads[p] for p in positions],
                      [variables[p] for p in positions], learning_rate)
    for p in rest:
        optimizer.update_step(grads[p], variables[p], learning_rate)


def _update_group(optimizer, grads, variables, learning_rate):
    """`AdamPlus.update_step` of a whole group, on its flat slots."""
    index = optimizer._get_variable_index(variables[0])
    slots = [optimizer._momentums[index].flat,
             optimizer._velocities[index].flat,
             optimizer._velocity_maxes[index].flat if optimizer.amsgrad
             else None]
    optimizer._rule_step(grads, variables, slots, index, learning_rate)
