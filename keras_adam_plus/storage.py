"""Where AdamPlus keeps its state and writes theta.

- Slots: one per (model variable, kind), in the variable's dtype or in
  `moment_dtype`, with the variable's layout (so that they follow its
  sharding under `keras.distribution`).
- `Target`: where a step writes theta (the variable itself, or a copy in
  the compute dtype that is rounded back once per step).
- Facts derived from the variable lists (fast-path groups and layouts,
  the variables a guarded step copies), cached per list (`per_variables`).
- Saved state: the values by index, as Keras saves them, plus the kind of
  each value ("momentum", "velocity", ...). A state loads only into an
  optimizer that has the same kinds in the same order with the same
  shapes, and a load that raises changes nothing. Loading into an optimizer
  that is not built yet keeps the state pending until `build`.
"""

import json

import keras
import numpy as np
from keras import ops

LOW_PRECISION = ("float16", "bfloat16")
KINDS_KEY = "slot_kinds"


def per_variables(optimizer, name, variables, compute, extra=()):
    """`compute()`, cached on `optimizer` under `name` per variable list.

    Recomputed when `variables` (the same objects, in order) or `extra`
    change. For facts Python would otherwise derive again every step from
    lists of variables (milliseconds a step with 1000 of them). The
    variables are kept with the key, so that their ids stay theirs.
    """
    variables = list(variables)
    key = (tuple(map(id, variables)), *extra)
    cached = optimizer.__dict__.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = compute()
    optimizer.__dict__[name] = (key, value, variables)
    return value


def state_dtype(variable, moment_dtype):
    """The dtype of `variable`'s slots: `moment_dtype` for half floats."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    if moment_dtype and dtype in LOW_PRECISION:
        return moment_dtype
    return dtype


def check_floating(var_list):
    """Refuses integer or boolean trainable variables (JAX zeroes them)."""
    for variable in var_list:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if "float" not in dtype:
            raise ValueError(
                "AdamPlus updates floating-point variables only. Received: "
                f"variable {getattr(variable, 'path', variable.name)!r} with "
                f"dtype={dtype}"
            )


def add_slots(optimizer, var_list, names, moment_dtype=None):
    """One list of zero slots per name, `None` where Keras wants none.

    Each slot has its variable's shape and layout (sharding), and its dtype
    (or `moment_dtype` for float16/bfloat16 variables).
    """
    return [
        [
            None if getattr(var, "overwrite_with_gradient", False)
            else optimizer.add_variable(
                tuple(var.shape), initializer="zeros",
                dtype=state_dtype(var, moment_dtype),
                layout=getattr(var, "_layout", None),
                name=f"{var.path.replace('/', '_')}_{name}",
            )
            for var in var_list
        ]
        for name in names
    ]


def write(optimizer, slot, old, increment, dtype):
    """Writes `old + increment` (compute dtype) to `slot`; returns it.

    In the slot's own dtype this is Keras's `assign_add`; otherwise the sum
    is rounded to the slot's dtype once.
    """
    if keras.backend.standardize_dtype(slot.dtype) == dtype:
        optimizer.assign_add(slot, increment)
        return slot
    new = ops.add(old, increment)
    optimizer.assign(slot, ops.cast(new, slot.dtype))
    return new


def put(optimizer, slot, new, dtype):
    """Writes `new` (compute dtype) to `slot`, rounded once; returns it."""
    if keras.backend.standardize_dtype(slot.dtype) == dtype:
        optimizer.assign(slot, new)
    else:
        optimizer.assign(slot, ops.cast(new, slot.dtype))
    return new


def read(slot, dtype):
    """The slot's value in the compute dtype."""
    if keras.backend.standardize_dtype(slot.dtype) == dtype:
        return slot
    return ops.cast(slot, dtype)


class Target:
    """Where an update step writes theta.

    The variable itself when it has the compute dtype (each `sub` an
    `assign_sub`, as Keras does); otherwise (float16/bfloat16 weights) a
    copy of theta in float32 that collects every change and is rounded to
    the variable's dtype once, in `finish`.
    """

    def __init__(self, optimizer, variable, dtype):
        self.optimizer, self.variable, self.dtype = optimizer, variable, dtype
        self.mixed = dtype != keras.backend.standardize_dtype(variable.dtype)
        self.value = ops.cast(variable, dtype) if self.mixed else variable

    def sub(self, delta):
        if delta is None:
            return
        if self.mixed:
            self.value = ops.subtract(self.value, delta)
        else:
            self.optimizer.assign_sub(self.variable, delta)

    def finish(self):
        if self.mixed:
            self.optimizer.assign(
                self.variable, ops.cast(self.value, self.variable.dtype)
            )


# ---------------------------------------------------------------- state --

def kinds(optimizer):
    """The kind of each of `optimizer.variables`, in order.

    A slot's kind is its name less its model variable's prefix
    ("momentum", "velocity", "average", "gradient_accumulator", ...); a
    scalar's is its name ("iteration", "learning_rate", "skipped_steps").
    """
    prefixes = sorted(
        (v.path.replace("/", "_") + "_"
         for v in getattr(optimizer, "_trainable_variables", [])),
        key=len, reverse=True,
    )
    result = []
    for variable in optimizer.variables:
        name = variable.name
        prefix = next((p for p in prefixes if name.startswith(p)), "")
        result.append(name[len(prefix):])
    return result


def _scalars(optimizer):
    """The state variables that exist before build, by kind."""
    found = {"iteration": optimizer._iterations}
    if isinstance(optimizer._learning_rate, keras.Variable):
        found["learning_rate"] = optimizer._learning_rate
    return found


def snapshot(optimizer, pending=None):
    """`(values, kinds)` of the state, built or still pending.

    A pending state (loaded before build) is returned with the current
    step count and learning rate, which were assigned at load and may have
    been changed since.
    """
    pending = pending or optimizer._pending_state
    if pending is None:
        return [v.numpy() for v in optimizer.variables], kinds(optimizer)
    # Plain lists: Keras tracks an optimizer's list attributes (the pending
    # state) as TrackedList, which does not pickle.
    values, saved_kinds = pending
    values = list(values)
    if saved_kinds is not None:
        saved_kinds = list(saved_kinds)
        scalars = _scalars(optimizer)
        for i, kind in enumerate(saved_kinds):
            if kind in scalars:
                values[i] = np.array(ops.convert_to_numpy(scalars[kind]))
    return values, saved_kinds


def assign_scalars(optimizer, values, saved_kinds):
    """Assigns the saved step count and learning rate (before build)."""
    if saved_kinds is None:
        return
    scalars = _scalars(optimizer)
    for value, kind in zip(values, saved_kinds):
        if kind in scalars and tuple(np.shape(value)) == ():
            scalars[kind].assign(value)


def save(optimizer, store):
    """Keras's indexed values, plus the kinds under `KINDS_KEY`.

    An optimizer not built yet saves the state it was given (pending).
    """
    values, saved_kinds = snapshot(optimizer) if (
        optimizer.built or optimizer._pending_state is not None) else (
        [v.numpy() for v in optimizer.variables], kinds(optimizer))
    for i, value in enumerate(values):
        store[str(i)] = value
    if saved_kinds is not None:
        store[KINDS_KEY] = _encode(saved_kinds)


def read_store(store):
    """`(values, kinds)` of a saved state (`kinds` None in older files)."""
    keys = [k for k in store.keys() if k != KINDS_KEY]
    values = [store[str(i)] for i in range(len(keys))]
    saved_kinds = None
    if KINDS_KEY in store.keys():
        saved_kinds = _decode(store[KINDS_KEY])
    return values, saved_kinds


def check_kinds_before_build(optimizer, saved_kinds, expected):
    """Refuses, before build, a state whose kinds this config never makes.

    `expected` is the set of kinds this optimizer's configuration creates.
    """
    if saved_kinds is None:
        return
    extra = sorted(set(saved_kinds) - set(expected))
    missing = sorted(set(expected) - set(saved_kinds))
    if extra or missing:
        raise ValueError(_mismatch(optimizer, extra, missing))


def assign(optimizer, values, saved_kinds, skip_scalars=False):
    """Assigns a saved state to a built optimizer, all or nothing.

    `skip_scalars`: leave the step count and learning rate (assigned when
    a pending state was loaded, and perhaps changed since) as they are.
    """
    variables = optimizer.variables
    if saved_kinds is not None:
        mine = kinds(optimizer)
        if saved_kinds != mine:
            extra = sorted(set(saved_kinds) - set(mine))
            missing = sorted(set(mine) - set(saved_kinds))
            if not (extra or missing):
                raise ValueError(
                    f"Cannot load the state of optimizer "
                    f"'{optimizer.name}': the saved state has "
                    f"{len(saved_kinds)} values of kinds {_count(saved_kinds)}"
                    f", this optimizer has {len(mine)} of kinds "
                    f"{_count(mine)}. Check that the model has the same "
                    "trainable variables."
                )
            raise ValueError(_mismatch(optimizer, extra, missing))
    elif len(values) != len(variables):
        raise ValueError(
            f"Cannot load the state of optimizer '{optimizer.name}': the "
            f"saved state has {len(values)} variables, this optimizer has "
            f"{len(variables)}. Check that amsgrad, use_ema and "
            "gradient_accumulation_steps match the saved optimizer's and "
            "that the model has the same trainable variables."
        )
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(
                f"Cannot load the state of optimizer '{optimizer.name}': "
                f"variable {variable.path} has shape {variable.shape}, "
                f"the saved value has shape {np.shape(value)}."
            )
    keep = set()
    if skip_scalars and saved_kinds is not None:
        keep = {id(v) for v in _scalars(optimizer).values()}
    for variable, value in zip(variables, values):
        if id(variable) not in keep:
            variable.assign(value)


def assign_pending(optimizer, values, saved_kinds):
    """`assign` at build time, which may run inside a traced function.

    TensorFlow builds an optimizer on its first `apply`, inside the
    `tf.function` of the train step: the values are assigned eagerly
    (`tf.init_scope`), once, not as ops of the traced step.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            assign(optimizer, values, saved_kinds, skip_scalars=True)
    else:
        assign(optimizer, values, saved_kinds, skip_scalars=True)


def _mismatch(optimizer, extra, missing):
    parts = []
    if extra:
        parts.append(f"the saved state has {', '.join(extra)}, which this "
                     "optimizer does not keep")
    if missing:
        parts.append(f"this optimizer keeps {', '.join(missing)}, which the "
                     "saved state lacks")
    return (
        f"Cannot load the state of optimizer '{optimizer.name}': "
        + "; ".join(parts) + ". The state was saved by an optimizer of "
        "another configuration (amsgrad, use_ema, average_decay, "
        "gradient_accumulation_steps, skip_nonfinite, scheduled betas or a "
        "learning-rate schedule differ)."
    )


def _count(names):
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def _encode(names):
    return np.frombuffer(json.dumps(names).encode("utf-8"), dtype=np.uint8)


def _decode(array):
    return json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode("utf-8"))

