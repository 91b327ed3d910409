"""The one owner of AdamPlus's state: `Store`, formats and saved faces.

- `Store` (made at build from the plan): every slot (m, v, v_max, the
  temporal average, beta products, `skipped_steps`), one per (model
  variable, kind) with the variable's layout (its sharding), or, for the
  plan's groups (JAX, opt-in), one flat slot per kind of which each
  variable's slot is a `GroupSlice`. Every write of a step goes through
  it, and keeps the old value while a step is guarded (`nonfinite`).
- `Format`: how a slot stores values (the weight's dtype or
  `moment_dtype`; block-wise 8- or 4-bit codes with a scale slot each,
  `keras_adam_plus.lowbit`), read into the compute dtype and written back
  once per step (`read`, `write`, `put`, `SlotState`, `Target`). Each
  variable's is its group's (`Store.formats`, `variable_groups`).
- The face every saving route sees (`Face`): the per-variable layout
  whatever the grouping, the kind of each value ("momentum", "velocity",
  ...) and the formats. A state loads only into an optimizer with the same
  kinds in the same order with the same shapes, and the same format per
  variable; a
  load that raises changes nothing; loading before build keeps the state
  pending until `build`. Routes that bypass these checks (Keras's state
  trees, and so Orbax) meet each slot's own: it refuses a value of
  another format (`guard`).
"""

import collections
import json

import keras
import numpy as np
from keras import ops

LOW_PRECISION = ("float16", "bfloat16")
CODES = "uint8"  # the dtype of a block-wise format's codes
KINDS_KEY = "slot_kinds"
# Saved only for a format other than "native": its name, or where the
# variables' formats differ (`variable_groups`), a list of one per variable.
FORMAT_KEY = "state_format"


def per_variables(cache, name, variables, compute, extra=()):
    """`compute()`, kept in `cache` (a dict) under `name` per variable list.

    Recomputed when `variables` (the same objects, in order) or `extra`
    change. For facts Python would otherwise derive again every step from
    lists of variables (milliseconds a step with 1000 of them). The
    variables are kept with the key, so that their ids stay theirs.
    """
    variables = list(variables)
    key = (tuple(map(id, variables)), *extra)
    cached = cache.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = compute()
    cache[name] = (key, value, variables)
    return value


def dtype_of(tensor):
    """The standardized dtype name of a variable or tensor."""
    return keras.backend.standardize_dtype(tensor.dtype)


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


MOMENTS = ("momentum", "velocity", "velocity_max")
AVERAGE = "temporal_average"
# The slots that start at ones; every other value of a state starts at 0.
BETA_POWERS = ("beta_1_power", "beta_2_power")


class Store:
    """The one owner of AdamPlus's state: its slots, writes and faces.

    Made at build from the plan: per variable and kind a slot in the
    dtype of the variable's format (`formats`, its group's) with the
    variable's layout (its sharding), or, for a
    plan's groups (JAX), one flat slot per kind of which each variable's
    slot is a `GroupSlice`; then a block-wise format's scale slots (one
    per quantized moment slot, `scale_of`), the temporal averages, the
    beta products (scheduled betas) and `skipped_steps`, in that order
    (Keras saves the optimizer's variables by index). Every write of a
    step goes through `assign`/`assign_add`/`assign_sub`, which keep the
    old value while a step is guarded (`keras_adam_plus.nonfinite`).
    Every slot it makes (moments, codes, scales, averages) refuses a value
    of another format (`guard`).

    Args:
        plan: The `plan.Plan`.
        variables: The model variables, in the plan's order.
        add_variable: The optimizer's `add_variable`.
        assign: The optimizer's `assign`, `assign_add` and `assign_sub`
            (a tuple of three callables).
        name: The optimizer's name (the prefix of slot paths).
        step_dtype: The dtype of the step count (`skipped_steps`).
    """

    def __init__(self, plan, variables, add_variable, assign, name,
                 step_dtype):
        self.plan, self.variables = plan, list(variables)
        self.formats = tuple(plan.format(i)
                             for i in range(len(self.variables)))
        self._assign, self._assign_add, self._assign_sub = assign
        self.cache = {}  # facts per variable list (`per_variables`)
        self.finite = None  # a bool tensor while a step is guarded
        self.checked = False  # inside the skip's own call of the step
        self.blocks = []
        names = list(MOMENTS[:3 if plan.hyper.amsgrad else 2])
        columns = self._add(add_variable, names, name, plan.groups,
                            lambda i: self.formats[i].slot_dtype(
                                self.variables[i], plan.moment_dtype),
                            lambda i: self.formats[i].slot_shape(
                                self.variables[i]))
        self.m, self.v = columns[0], columns[1]
        self.v_max = columns[2] if plan.hyper.amsgrad else None
        self.scales = self._add_scales(add_variable, names, columns)
        self.averages = None
        if plan.average_decay is not None:
            self.averages = self._add(
                add_variable, [AVERAGE], name, (),
                lambda i: state_dtype(self.variables[i],
                                      plan.moment_dtype))[0]
        self.beta_powers = None
        if plan.betas_scheduled:
            # prod_{i<=t} beta_i, the bias correction of scheduled betas,
            # in float64 where a variable is float64.
            dtype = "float64" if any(dtype_of(v) == "float64"
                                     for v in variables) else "float32"
            self.beta_powers = [
                add_variable((), initializer="ones", dtype=dtype, name=name)
                for name in BETA_POWERS]
        self.skipped = None
        if plan.skip_nonfinite:
            self.skipped = add_variable((), initializer="zeros",
                                        dtype=step_dtype,
                                        name="skipped_steps")

    def _add(self, add_variable, names, prefix, groups, dtype,
             shape=None):
        """One list of slots per name, `None` where Keras wants none;
        `dtype(i)` is variable i's slot dtype, `shape(i)` its slot shape
        (default: the variable's)."""
        var_list = self.variables
        group_of = {i: g for g, members in enumerate(groups) for i in members}
        offsets = {}
        for members in groups:
            offset = 0
            for i in members:
                offsets[i] = offset
                offset += size(var_list[i].shape)
        result = []
        for name in names:
            flats, column, block = {}, [], set()
            for i, var in enumerate(var_list):
                if getattr(var, "overwrite_with_gradient", False):
                    column.append(None)
                    continue
                slot_name = f"{label(var).replace('/', '_')}_{name}"
                if i not in group_of:
                    slot = add_variable(
                        shape(i) if shape else tuple(var.shape),
                        initializer="zeros", dtype=dtype(i),
                        layout=getattr(var, "_layout", None), name=slot_name)
                    guard(slot, self.formats[i] if name in MOMENTS
                          else NATIVE, var)
                    block.add(id(slot))
                    column.append(slot)
                    continue
                g = group_of[i]
                if g not in flats:
                    members = groups[g]
                    flats[g] = add_variable(
                        (sum(size(var_list[j].shape) for j in members),),
                        initializer="zeros", dtype=dtype(i),
                        name=f"group_{g}_{name}")
                    guard(flats[g], NATIVE, var)  # groups keep floats
                    block.add(id(flats[g]))
                column.append(GroupSlice(flats[g], offsets[i],
                                         tuple(var.shape), slot_name, prefix))
            if groups:
                self.blocks.append((block, column))
            result.append(column)
        return result

    def _add_scales(self, add_variable, names, columns):
        """The scale slots of a block-wise format, after the moments':
        `{id(codes slot): (scale slot, signed, the variable's shape)}`
        (m's map is signed)."""
        scales = {}
        for name, column in zip(names, columns):
            for var, fmt, slot in zip(self.variables, self.formats, column):
                shape = None if slot is None or isinstance(
                    slot, GroupSlice) else fmt.scale_shape(var)
                if shape is None:
                    continue
                scale = add_variable(
                    shape, initializer="zeros", dtype="float32",
                    name=f"{label(var).replace('/', '_')}_{name}_scale")
                guard(scale, fmt, var, "scales")
                scales[id(slot)] = (scale, name == "momentum",
                                    tuple(var.shape))
        return scales

    def scale_of(self, slot):
        """`(scale slot, signed, shape)` of a slot that keeps scales, or
        None."""
        return self.scales.get(id(slot)) if self.scales else None

    def slots(self, index):
        """The m, v and v_max slots of variable `index` (v_max None)."""
        return [self.m[index], self.v[index],
                self.v_max[index] if self.v_max is not None else None]

    def flat_slots(self, index):
        """The flat m, v and v_max slots of `index`'s group."""
        return [s.flat if s is not None else None for s in self.slots(index)]

    def written(self):
        """The state variables a step writes through this store."""
        found = {}
        for column in (self.m, self.v, self.v_max, self.averages,
                       self.beta_powers):
            for s in column or ():
                if s is not None:
                    s = s.flat if isinstance(s, GroupSlice) else s
                    found[id(s)] = s
        for scale, *_ in self.scales.values():
            found[id(scale)] = scale
        return list(found.values())

    def entries(self, variables):
        """`variables` (the optimizer's) in the per-variable layout.

        Each block of slots of one kind of which some are `GroupSlice`s of
        flat slots is listed in its variables' order: the values and
        order an optimizer without groups has, so that saved files do not
        depend on grouping.
        """
        if not self.blocks:
            return list(variables)
        block_of = {i: b for b, (ids, _) in enumerate(self.blocks)
                    for i in ids}
        result, done = [], set()
        for variable in variables:
            b = block_of.get(id(variable))
            if b is None:
                result.append(variable)
            elif b not in done:
                done.add(b)
                result.extend(s for s in self.blocks[b][1] if s is not None)
        return result

    # Writes: each keeps the old value while a step is guarded.

    def assign(self, variable, value):
        """Writes `value` to `variable` (the old one on a skipped step)."""
        if self.finite is not None:
            value = ops.where(self.finite, ops.cast(value, variable.dtype),
                              ops.convert_to_tensor(variable))
        self._assign(variable, value)

    def assign_add(self, variable, value):
        """Adds `value` to `variable` (nothing on a skipped step)."""
        if self.finite is not None:
            return self.assign(variable, ops.add(
                variable, ops.cast(value, variable.dtype)))
        self._assign_add(variable, value)

    def assign_sub(self, variable, value):
        """Subtracts `value` from `variable` (nothing on a skipped step)."""
        if self.finite is not None:
            return self.assign(variable, ops.subtract(
                variable, ops.cast(value, variable.dtype)))
        self._assign_sub(variable, value)


def guard(slot, fmt, variable, kept="values"):
    """Makes `slot.assign` refuse, in one line, a value of another format.

    Keras's `set_state_tree` (and so its Orbax checkpoints) assigns each
    value to the variable of the same path by `variable.assign`, which
    casts: a state of another `state_format` or `state_format_min_size`
    would land in the slots of this one, float m cast into uint8 codes,
    codes read as moments. So each slot the store makes refuses a value
    of the other dtype kind (uint8 codes against floats) or of another
    shape. The check is static, so it holds in traced steps too, and never
    fires on AdamPlus's own writes, which keep the slot's dtype and shape.
    The routes AdamPlus loads itself check every value before the first
    write (`assign`, `check_format`); this is the last line, for Keras's
    routes that bypass them. Wrapped per instance, the least magic that
    works on every backend's `keras.Variable`.

    Args:
        slot: The slot (a `keras.Variable`), of `variable`'s.
        fmt: The `Format` of the slot's values (a moment's: the
            variable's; `NATIVE` for the rest).
        variable: The model variable the slot belongs to.
        kept: What the slot keeps, as the refusal names it: "values"
            (codes when uint8) or "scales".
    """
    assign, path, shape = slot.assign, slot.path, tuple(slot.shape)
    codes = dtype_of(slot) == CODES
    is_codes = {}  # per dtype of a value

    def checked(value):
        dtype = getattr(value, "dtype", None)
        if dtype is None:
            dtype = np.asarray(value).dtype
        if dtype not in is_codes:
            is_codes[dtype] = keras.backend.standardize_dtype(dtype) == CODES
        got = getattr(value, "shape", None)
        got = tuple(got) if got is not None else np.shape(value)
        if is_codes[dtype] != codes or len(got) != len(shape) or any(
                a is not None and a != b for a, b in zip(got, shape)):
            raise ValueError(
                f"Cannot assign a {keras.backend.standardize_dtype(dtype)} "
                f"value of shape {got} to optimizer variable {path}: it "
                f"keeps state format {_kept(slot, fmt, variable, kept)}; a "
                "state of another state_format or state_format_min_size (a "
                "state tree, an Orbax checkpoint) is refused: load it into "
                "an optimizer of the format that saved it.")
        return assign(value)

    slot.assign = checked


def _kept(slot, fmt, variable, kept):
    """What `slot` keeps, as `guard` names it: "'8bit' (uint8 codes of
    shape (64, 80))", "'native' (float32 values of shape (80,); '8bit'
    keeps it native: under 4096 elements)"."""
    dtype, shape = dtype_of(slot), tuple(slot.shape)
    if kept == "scales" or dtype == CODES:
        what = "codes" if dtype == CODES else kept
        return f"{fmt.name!r} ({dtype} {what} of shape {shape})"
    reason = fmt.keeps(variable)
    why = f"; {fmt.name!r} keeps it native: {reason}" if reason else ""
    return f"{NATIVE.name!r} ({dtype} values of shape {shape}{why})"


def label(variable):
    """A variable's path, or its name where it has none (`tf.Variable`)."""
    path = getattr(variable, "path", None)
    return path if path is not None else variable.name.split(":")[0]


def size(shape):
    """The number of elements of a tensor of `shape`.

    A Python loop, not NumPy's product (nor `math.prod` of a generator):
    `torch.compile` traces it without a graph break.
    """
    n = 1
    for d in shape:
        n *= int(d)
    return n


class GroupSlice:
    """One variable's slot inside a group's flat slot (see `add_slots`).

    Where a group of small variables keeps one flat slot per kind (one
    kernel for the group instead of one per variable; see
    `keras_adam_plus.backends.jax_grouped`), this is the part of it that
    is the variable's own slot: its shape and the name the slot would
    have had, so that saved files hold the same values as without groups.
    """

    def __init__(self, flat, offset, shape, name, optimizer_name):
        self.flat, self.offset, self.shape = flat, offset, shape
        self.size = size(shape)
        self.name, self.path = name, f"{optimizer_name}/{name}"
        self.dtype = flat.dtype

    def value_of(self, flat_value):
        """This slot's part of `flat_value` (a tensor or an array)."""
        piece = flat_value[self.offset:self.offset + self.size]
        if isinstance(piece, np.ndarray):
            return piece.reshape(self.shape)
        return ops.reshape(piece, self.shape)

    def numpy(self):
        return self.value_of(np.asarray(self.flat.numpy()))


def numpy_values(state):
    """NumPy values of `entries`, each flat slot read once."""
    flats = {}
    result = []
    for entry in state:
        if isinstance(entry, GroupSlice):
            key = id(entry.flat)
            if key not in flats:
                flats[key] = np.asarray(entry.flat.numpy())
            result.append(entry.value_of(flats[key]))
        else:
            result.append(entry.numpy())
    return result


class Format:
    """How a slot stores its values: the format of AdamPlus's state.

    The default keeps each value in the slot's dtype (the weight's, or
    `moment_dtype` for half-precision weights) and reads it into the
    compute dtype by a cast. A format is one subclass: `slot_dtype` (the
    dtype of the slot it needs), `decode` (stored to compute dtype) and
    `encode` (compute dtype to stored), elementwise, so that flat groups,
    sparse rows and the non-finite select work on any format. Only the
    default (`native`) one is what torch's fused kernel reads. Slots start
    at zeros, so a format must read zeros (codes and scales) as 0.
    """

    name = "native"
    native = True
    scaled = False  # keeps block scales (see `scale_shape`)

    def slot_dtype(self, variable, moment_dtype):
        """The dtype of `variable`'s slots in this format."""
        return state_dtype(variable, moment_dtype)

    def slot_shape(self, variable):
        """The shape of `variable`'s own moment slots (packed codes may
        differ from the variable's)."""
        return tuple(variable.shape)

    def keeps(self, variable):
        """Why `variable`'s slots keep the native format rather than this
        one, or None (they keep this one)."""
        return None

    def decode(self, stored, dtype):
        """`stored` (a slot's value) as a tensor of the compute `dtype`."""
        if keras.backend.standardize_dtype(stored.dtype) == dtype:
            return stored
        return ops.cast(stored, dtype)

    def encode(self, value, slot_dtype):
        """`value` (compute dtype) as the slot stores it, rounded once."""
        if keras.backend.standardize_dtype(value.dtype) == slot_dtype:
            return value
        return ops.cast(value, slot_dtype)

    # Block-wise formats (`keras_adam_plus.lowbit`): a variable whose
    # `scale_shape` is not None keeps, beside each moment slot (its codes),
    # a float32 slot of that shape (its scales, a kind of its own, e.g.
    # "momentum_scale"); such a slot is read and written whole through
    # `decode_scaled`/`encode_scaled`, signed for m, unsigned for the rest.

    def scale_shape(self, variable):
        """The shape of `variable`'s scale slots, or None (none kept)."""
        return None

    def decode_scaled(self, codes, scales, dtype, signed, shape):
        """A slot's `codes` and `scales` as a tensor of `dtype` and of
        the variable's `shape`."""
        raise NotImplementedError

    def encode_scaled(self, value, signed):
        """`(codes, scales)` of `value` (compute dtype)."""
        raise NotImplementedError

    def describe(self, variables):
        """A line for `AdamPlus.describe()`, or None (the default)."""
        return None


NATIVE = Format()


def write(store, slot, old, increment, dtype, fmt=NATIVE):
    """Writes `old + increment` (compute dtype) to `slot` of format `fmt`;
    returns it.

    In the slot's own dtype this is `assign_add`; otherwise the sum is
    rounded to the slot's dtype (encoded) once.
    """
    if (fmt.native and not isinstance(slot, GroupSlice)
            and dtype_of(slot) == dtype):
        store.assign_add(slot, increment)
        return slot
    return put(store, slot, ops.add(old, increment), dtype, fmt)


def put(store, slot, new, dtype, fmt=NATIVE):
    """Writes `new` (compute dtype) to `slot` of format `fmt`, encoded
    once; returns it."""
    slot_dtype = dtype_of(slot)
    scaled = store.scale_of(slot)
    if scaled is not None:
        codes, scales = fmt.encode_scaled(new, scaled[1])
        store.assign(slot, codes)
        store.assign(scaled[0], scales)
        return new
    value = new if fmt.native and slot_dtype == dtype else fmt.encode(
        new, slot_dtype)
    if isinstance(slot, GroupSlice):
        store.assign(slot.flat, ops.slice_update(
            slot.flat.value, (slot.offset,), ops.reshape(value, (-1,))))
    else:
        store.assign(slot, value)
    return new


def read(slot, dtype, fmt=NATIVE, scaled=None):
    """The slot's value in the compute dtype (decoded); `scaled`: its
    `(scale slot, signed, shape)` where it keeps scales (`scale_of`)."""
    if scaled is not None:
        return fmt.decode_scaled(ops.convert_to_tensor(slot),
                                 ops.convert_to_tensor(scaled[0]), dtype,
                                 scaled[1], scaled[2])
    value = slot.value_of(slot.flat.value) if isinstance(
        slot, GroupSlice) else slot
    if fmt.native and dtype_of(slot) == dtype:
        return value
    return fmt.decode(value, dtype)


def flat(tensors):
    """One tensor: itself, or the tensors flattened and concatenated."""
    if len(tensors) == 1:
        return tensors[0]
    pieces = [ops.reshape(t, (-1,)) for t in tensors]
    if not _eager_jax(pieces[0]):
        return ops.concatenate(pieces)
    # Run eagerly, a concatenation of hundreds of pieces is one program
    # compiled for that many inputs (about a second at 400); writes into a
    # flat buffer compile once per piece size and dispatch in O(N).
    result = ops.zeros((sum(size(p.shape) for p in pieces),), pieces[0].dtype)
    offset = 0
    for piece in pieces:
        result = ops.slice_update(result, (offset,), piece)
        offset += size(piece.shape)
    return result


def sub_pieces(targets, delta):
    """`target.sub` of each target's part of `delta` (see `flat`)."""
    if delta is None:
        return
    if len(targets) == 1:
        targets[0].sub(delta)
        return
    # One slice per piece, not one `ops.split`: run eagerly, a split into
    # hundreds of pieces compiles superlinearly (seconds at 400), slices
    # at given offsets once per piece size; under jit all are static
    # slices of one program.
    eager = _eager_jax(delta)
    offset = 0
    for target in targets:
        shape = tuple(target.variable.shape)
        end = offset + size(shape)
        piece = (ops.slice(delta, (offset,), (end - offset,)) if eager
                 else delta[offset:end])
        target.sub(ops.reshape(piece, shape))
        offset = end


def _eager_jax(tensor):
    """Whether `tensor` is a concrete JAX array (an eager step on JAX)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return not isinstance(tensor, jax.core.Tracer)


class SlotState:
    """`rule.step`'s state for one variable or a group (flat slots).

    `slots` are the m, v and v_max slots (v_max None without AMSGrad) in
    format `fmt` (the variables' group's): a variable's own, or a group's
    flat ones, whose gradients and theta are flattened and concatenated
    (`flat`) and whose decrements are cut back per variable
    (`sub_pieces`). `finish()` rounds theta copies back.
    """

    def __init__(self, store, variables, slots, dtype, fmt=NATIVE):
        self.store, self.dtype, self.format = store, dtype, fmt
        self.slots = dict(zip(("m", "v", "v_max"), slots))
        self.targets = [Target(store, v, dtype) for v in variables]

    def theta(self):
        return flat([t.value for t in self.targets])

    def sub_theta(self, delta):
        sub_pieces(self.targets, delta)

    def read(self, kind):
        slot = self.slots[kind]
        return read(slot, self.dtype, self.format,
                    self.store.scale_of(slot))

    def add(self, kind, old, increment):
        return write(self.store, self.slots[kind], old, increment,
                     self.dtype, self.format)

    def put(self, kind, new):
        return put(self.store, self.slots[kind], new, self.dtype,
                   self.format)

    def finish(self):
        for target in self.targets:
            target.finish()


def large_blockwise(store, index, variable, min_size):
    """Whether `variable` (position `index` in `store`) keeps block-wise
    state and has at least `min_size` elements (the compiled steps of
    `keras_adam_plus.backends`)."""
    return (store.scale_of(store.slots(index)[0]) is not None
            and size(variable.shape) >= min_size)


class TensorState:
    """`rule.step`'s state over tensors rather than variables: for the
    compiled steps of one block-wise variable (`keras_adam_plus.backends`).

    `value` is theta in the compute dtype `dtype`, `slots` maps each kind
    to its `(codes, scales)`, `shape` is the (flattened or whole) shape
    they decode to. Writes are not assigned: each kind's new `(codes,
    scales)` is kept in `written`, theta in `value`, for the caller.
    """

    def __init__(self, value, slots, fmt, dtype, shape):
        self.value, self.slots, self.format = value, slots, fmt
        self.dtype, self.shape = dtype, tuple(shape)
        self.written = {}

    def theta(self):
        return self.value

    def sub_theta(self, delta):
        if delta is not None:
            self.value = ops.subtract(self.value, delta)

    def read(self, kind):
        codes, scales = self.slots[kind]
        return self.format.decode_scaled(codes, scales, self.dtype,
                                         kind == "m", self.shape)

    def add(self, kind, old, increment):
        return self.put(kind, ops.add(old, increment))

    def put(self, kind, new):
        self.written[kind] = self.format.encode_scaled(new, kind == "m")
        return new


class Target:
    """Where an update step writes theta.

    The variable itself when it has the compute dtype (each `sub` an
    `assign_sub`, as Keras does); otherwise (float16/bfloat16 weights) a
    copy of theta in float32 that collects every change and is rounded to
    the variable's dtype once, in `finish`.
    """

    def __init__(self, store, variable, dtype):
        self.store, self.variable, self.dtype = store, variable, dtype
        self.mixed = dtype != dtype_of(variable)
        self.value = ops.cast(variable, dtype) if self.mixed else variable

    def sub(self, delta):
        if delta is None:
            return
        if self.mixed:
            self.value = ops.subtract(self.value, delta)
        else:
            self.store.assign_sub(self.variable, delta)

    def finish(self):
        if self.mixed:
            self.store.assign(self.variable,
                              ops.cast(self.value, self.variable.dtype))


# ---------------------------------------------------------------- state --

class Face(collections.namedtuple("Face", [
        "name", "entries", "own", "model", "scalars", "pending", "built",
        "formats"])):
    """How every saving route sees an optimizer's state.

    `name`: the optimizer's; `entries`: its state in the per-variable
    layout (`Store.entries`); `own`: its `variables` as Keras holds them;
    `model`: the model variables it was built with; `scalars`: the state
    variables that exist before build, by kind ("iteration",
    "learning_rate"); `pending`: a state loaded before build, or None;
    `built`: whether it is built; `formats`: built, each model variable's
    `Format` (`Store.formats`); before, each group's, the default's first
    (`plan.Plan.group_formats`).
    """


def _owned(face):
    """`(model variable position or None, kind)` of each of `entries`."""
    prefixes = sorted(
        ((label(v).replace("/", "_") + "_", i)
         for i, v in enumerate(face.model)),
        key=lambda p: len(p[0]), reverse=True,
    )
    result = []
    for variable in face.entries:
        name = variable.name
        prefix, owner = next(((p, i) for p, i in prefixes
                              if name.startswith(p)), ("", None))
        result.append((owner, name[len(prefix):]))
    return result


def kinds(face):
    """The kind of each value of the state (`entries`), in order.

    A slot's kind is its name less its model variable's prefix
    ("momentum", "velocity", "average", "gradient_accumulator", ...); a
    scalar's is its name ("iteration", "learning_rate", "skipped_steps").
    """
    return [kind for _, kind in _owned(face)]


def _entry_formats(face):
    """The `Format` of each moment of `entries` (None for other kinds)."""
    return [face.formats[owner] if kind in MOMENTS and owner is not None
            and face.built else None for owner, kind in _owned(face)]


def record(face):
    """The format record saved with the state: one name where every
    variable keeps one format, else the list of each variable's."""
    names = [f.name for f in face.formats]
    if not face.built or len(set(names)) <= 1:
        return names[0] if names else NATIVE.name
    return names


def snapshot(face):
    """`(values, kinds, format record)` of the state, built or pending.

    A pending state (loaded before build) is returned with the current
    step count and learning rate, which were assigned at load and may have
    been changed since.
    """
    pending = face.pending
    if pending is None:
        return numpy_values(face.entries), kinds(face), record(face)
    # Plain lists: Keras tracks an optimizer's list attributes (the pending
    # state) as TrackedList, which does not pickle.
    values, saved_kinds = pending[:2]
    values = list(values)
    if saved_kinds is not None:
        saved_kinds = list(saved_kinds)
        scalars = face.scalars
        for i, kind in enumerate(saved_kinds):
            if kind in scalars:
                values[i] = np.array(ops.convert_to_numpy(scalars[kind]))
    saved = record(face)
    if isinstance(pending, tuple) and len(pending) > 2:
        saved = pending[2] if isinstance(pending[2], str) else list(
            pending[2])
    return values, saved_kinds, saved


def assign_scalars(scalars, values, saved_kinds):
    """Assigns the saved step count and learning rate (before build)."""
    if saved_kinds is None:
        return
    for value, kind in zip(values, saved_kinds):
        if kind in scalars and tuple(np.shape(value)) == ():
            scalars[kind].assign(value)


def save(face, store):
    """Keras's indexed values, plus the kinds under `KINDS_KEY`.

    An optimizer not built yet saves the state it was given (pending).
    """
    values, saved_kinds, saved = snapshot(face)
    for i, value in enumerate(values):
        store[str(i)] = value
    if saved_kinds is not None:
        store[KINDS_KEY] = _encode(saved_kinds)
    if saved != NATIVE.name:
        store[FORMAT_KEY] = _encode(saved)


def read_store(store):
    """`(values, kinds)` of a saved state (`kinds` None in older files)."""
    keys = [k for k in store.keys() if k not in (KINDS_KEY, FORMAT_KEY)]
    values = [store[str(i)] for i in range(len(keys))]
    saved_kinds = None
    if KINDS_KEY in store.keys():
        saved_kinds = _decode(store[KINDS_KEY])
    return values, saved_kinds


def check_kinds_before_build(name, saved_kinds, expected):
    """Refuses, before build, a state whose kinds this config never makes.

    `expected` is the set of kinds this optimizer's configuration creates.
    """
    if saved_kinds is None:
        return
    extra = sorted(set(saved_kinds) - set(expected))
    missing = sorted(set(expected) - set(saved_kinds))
    if extra or missing:
        raise ValueError(_mismatch(name, extra, missing))


def assign(face, values, saved_kinds, skip_scalars=False):
    """Assigns a saved state to a built optimizer, all or nothing.

    `skip_scalars`: leave the step count and learning rate (assigned when
    a pending state was loaded, and perhaps changed since) as they are.
    """
    variables = face.entries
    if saved_kinds is not None:
        mine = kinds(face)
        if saved_kinds != mine:
            extra = sorted(set(saved_kinds) - set(mine))
            missing = sorted(set(mine) - set(saved_kinds))
            if not (extra or missing):
                raise ValueError(
                    f"Cannot load the state of optimizer "
                    f"'{face.name}': the saved state has "
                    f"{len(saved_kinds)} values of kinds {_count(saved_kinds)}"
                    f", this optimizer has {len(mine)} of kinds "
                    f"{_count(mine)}. Check that the model has the same "
                    "trainable variables."
                )
            raise ValueError(_mismatch(face.name, extra, missing))
    elif len(values) != len(variables):
        raise ValueError(
            f"Cannot load the state of optimizer '{face.name}': the "
            f"saved state has {len(values)} variables, this optimizer has "
            f"{len(variables)}. Check that amsgrad, use_ema and "
            "gradient_accumulation_steps match the saved optimizer's and "
            "that the model has the same trainable variables."
        )
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(
                f"Cannot load the state of optimizer '{face.name}': "
                f"variable {variable.path} has shape {variable.shape}, "
                f"the saved value has shape {np.shape(value)}."
            )
        check_codes(face.name, variable, value)
    keep = set()
    if skip_scalars and saved_kinds is not None:
        keep = {id(v) for v in face.scalars.values()}
    flats = {}
    for variable, value in zip(variables, values):
        if isinstance(variable, GroupSlice):
            flat = flats.setdefault(id(variable.flat), (
                variable.flat, np.array(variable.flat.numpy())))[1]
            flat[variable.offset:variable.offset + variable.size] = (
                np.reshape(value, -1))
        elif id(variable) not in keep:
            variable.assign(value)
    for variable, value in flats.values():
        variable.assign(value)


def logical(face, values, kinds_, encode=False):
    """`values` of the moment kinds decoded from (or, `encode`, into) the
    face's format: what `get_weights`/`set_weights` exchange, so that they
    do not depend on the format (the default's values are as stored).

    A block-wise format's `get_weights` are its stored values (codes and
    scales: decoding and encoding again would move m where a block's
    absmax is negative, the signed map having no -1); `set_weights` also
    takes the decoded layout of a native optimizer (`encode`: `values`
    lack the scales, which are encoded in their places): a conversion.
    """
    formats = _entry_formats(face)
    if all(f is None or f.native or (f.scaled and not encode)
           for f in formats):
        return list(values)
    pairs = _scaled_pairs(face, kinds_)
    scale_at = set(pairs.values())
    if scale_at:
        given = iter(values)
        values = [None if i in scale_at else next(given)
                  for i in range(len(face.entries))]
    result = list(values)
    for i, (value, entry, kind) in enumerate(zip(values, face.entries,
                                                 kinds_)):
        fmt = formats[i]
        if kind not in MOMENTS or fmt is None or fmt.native:
            continue
        slot_dtype = dtype_of(entry)
        if i in pairs:
            signed = kind == "momentum"
            codes, scales = fmt.encode_scaled(ops.convert_to_tensor(
                np.asarray(value, "float32")), signed)
            result[i] = np.asarray(ops.convert_to_numpy(codes))
            result[pairs[i]] = np.asarray(ops.convert_to_numpy(scales))
            continue
        dtype = "float64" if slot_dtype == "float64" else "float32"
        tensor = ops.convert_to_tensor(np.asarray(value, dtype if encode
                                                  else slot_dtype))
        result[i] = np.asarray(ops.convert_to_numpy(
            fmt.encode(tensor, slot_dtype) if encode
            else fmt.decode(tensor, dtype)))
    return result


def _scaled_pairs(face, kinds_):
    """`{position of a moment's codes: position of its scales}` in
    `face.entries` (a scale slot is named as its codes, plus "_scale")."""
    position = {entry.name: i for i, entry in enumerate(face.entries)}
    pairs = {}
    for i, (entry, kind) in enumerate(zip(face.entries, kinds_)):
        j = position.get(entry.name + "_scale") if kind in MOMENTS else None
        if j is not None:
            pairs[i] = j
    return pairs


def logical_entries(face):
    """`face.entries` less the scales of a block-wise format: the layout
    of `get_weights`."""
    if not any(f.scaled for f in face.formats):
        return list(face.entries)
    scale_at = set(_scaled_pairs(face, kinds(face)).values())
    return [e for i, e in enumerate(face.entries) if i not in scale_at]


def get_weights(face):
    """`AdamPlus.get_weights`: the per-variable layout, decoded (a
    block-wise format's as stored: codes and scales)."""
    return logical(face, numpy_values(face.entries), kinds(face))


def unpickled(face, state):
    """The state of a pickle (`snapshot`), checked and left pending; the
    step count and learning rate are assigned now."""
    if isinstance(state, tuple):
        if len(state) > 2:  # pickled with its format's name
            check_format(face, state[2])
        assign_scalars(face.scalars, *state[:2])
    return state


def set_weights(face, weights):
    """`AdamPlus.set_weights`: all the values, or none of them.

    `weights` may have the per-variable layout (`entries`, what
    `get_weights` returns and what an optimizer without groups has) or
    this optimizer's own `variables` (the legacy `.h5` format saves
    those); a block-wise format also takes a native optimizer's values
    (one per moment, no scales), and encodes them. Every shape is
    checked before anything is written.
    """
    weights = [np.asarray(w) for w in weights]
    per_variable = logical_entries(face)
    layouts = [(per_variable, "per-variable", _decoded_shapes(
        face, per_variable)), (list(face.own), "own", None)]
    if any(f.scaled for f in face.formats):  # stored values first
        layouts.insert(0, (list(face.entries), "stored", None))
    mine = layouts[0][0]
    for layout, name, shapes in layouts:
        shapes = shapes or [tuple(v.shape) for v in layout]
        if len(layout) == len(weights) and all(
                s == w.shape for s, w in zip(shapes, weights)):
            if name == "stored":
                assign(face, weights, None)
            elif name == "own":
                for variable, value in zip(layout, weights):
                    check_codes(face.name, variable, value)
                for variable, value in zip(layout, weights):
                    variable.assign(value)
            else:
                assign(face, logical(face, weights, kinds(face),
                                     encode=True), None)
            return
    first = next((i for i, (v, w) in enumerate(zip(mine, weights))
                  if tuple(v.shape) != w.shape), min(len(mine),
                                                     len(weights)))
    where = (f"value {first} has shape {weights[first].shape}, the "
             f"optimizer's {mine[first].path} has {tuple(mine[first].shape)}"
             if first < min(len(mine), len(weights)) else "")
    raise ValueError(
        f"Cannot set the weights of optimizer '{face.name}': it has "
        f"{len(mine)} values in the per-variable layout, received "
        f"{len(weights)}" + (f"; {where}" if where else "") + ". Nothing "
        "was assigned."
    )


def _decoded_shapes(face, entries):
    """The shapes of `entries`' decoded values: a moment's is its model
    variable's (packed 4-bit codes have another)."""
    shapes = {f"{label(v).replace('/', '_')}_{kind}": tuple(v.shape)
              for v in face.model for kind in MOMENTS}
    return [shapes.get(e.name, tuple(e.shape)) for e in entries]


def check_codes(name, variable, value):
    """Refuses a float value for a slot of low-bit codes, or codes for a
    float slot (a state saved with another `state_format_min_size`)."""
    codes = dtype_of(variable) == CODES
    if codes != (np.asarray(value).dtype == CODES):
        raise ValueError(
            f"Cannot load the state of optimizer '{name}': variable "
            f"{variable.path} keeps {dtype_of(variable)} values, the saved "
            f"value is {np.asarray(value).dtype} (a state saved with "
            "another state_format or state_format_min_size).")


def check_format(face, saved):
    """Refuses a state saved in other formats than the face's.

    `saved` is the saved record (`record`): one name, every variable's,
    or a list of each variable's. Built, each variable must keep its saved
    format (the first that does not is named); before build, each saved
    name must be one of the groups' (the rest is checked at build). A list
    of another length is left to the kinds' check.
    """
    names = [f.name for f in face.formats]
    per_variable = [saved] * len(names) if isinstance(saved, str) else saved
    if face.built:
        if len(per_variable) != len(names):
            return
        bad = next((i for i, (a, b) in enumerate(zip(per_variable, names))
                    if a != b), None)
        if bad is None:
            return
        if isinstance(saved, list) or len(set(names)) > 1:
            raise ValueError(
                f"Cannot load the state of optimizer '{face.name}': "
                f"variable {label(face.model[bad])} was saved in state "
                f"format {per_variable[bad]!r}, this optimizer keeps it in "
                f"{names[bad]!r} (`state_format` or a `variable_groups` "
                "rule's differs from the saver's). Load it into an "
                "optimizer of the saved formats.")
    elif set(per_variable if isinstance(saved, list) else [saved]) <= set(
            names):
        return
    raise ValueError(
        f"Cannot load the state of optimizer '{face.name}': it was saved "
        f"in state format {_formats(saved)}, this optimizer keeps "
        f"{_formats(names if len(set(names)) > 1 else names[0], face.built)}"
        ". Load it into an optimizer of the saved format.")


def _formats(record_, per_variable=True):
    """A format record (or the groups' formats) as a message shows it."""
    if isinstance(record_, str):
        return repr(record_)
    return " and ".join(repr(n) for n in sorted(set(record_))) + (
        " (per variable)" if per_variable else " (per variable group)")


def load(face, store, plan, use_ema, accumulates):
    """`AdamPlus.load_own_variables`: returns the state left pending.

    Built: the state is assigned, all or nothing (None is returned).
    Before build: refused unless it has the kinds this configuration
    (`plan`, `use_ema`, gradient accumulation) keeps; the step count and
    learning rate, which exist before build, are assigned now (a later
    `optimizer.learning_rate = ...` wins) and the rest is returned, to be
    assigned at build (`assign_pending`). A state saved before build (the
    step count, at 0, and the learning rate alone) loads as a fresh
    optimizer's (`_load_fresh`).
    """
    values, saved_kinds = read_store(store)
    saved = _decode(store[FORMAT_KEY]) if FORMAT_KEY in store.keys() \
        else NATIVE.name
    check_format(face, saved)
    if _saved_unbuilt(face, values, saved_kinds):
        return _load_fresh(face, values, saved_kinds)
    if face.built:
        assign(face, values, saved_kinds)
        return None
    optional = {
        "learning_rate": "learning_rate" in face.scalars,
        "velocity_max": plan.hyper.amsgrad,
        AVERAGE: plan.average_decay is not None,
        **dict.fromkeys(BETA_POWERS, plan.betas_scheduled),
        "skipped_steps": plan.skip_nonfinite, "average": use_ema,
        "gradient_accumulator": accumulates}
    # A block-wise format keeps scales only for large enough variables.
    scales = {f"{k}_scale" for k in MOMENTS} if any(
        f.scaled for f in face.formats) else set()
    check_kinds_before_build(face.name, saved_kinds, {
        "iteration", "momentum", "velocity"} | {
        k for k, on in optional.items() if on} | (
        scales & set(saved_kinds or ())))
    assign_scalars(face.scalars, values, saved_kinds)
    return values, saved_kinds, saved


def _saved_unbuilt(face, values, saved_kinds):
    """Whether a saved state is that of an optimizer never built: this
    one's scalars alone (the step count, the learning rate), at step 0.

    A model compiled and saved before its first step saves only these
    (the slots are made at build); at a step count > 0 the moments were
    lost (see `_check_nothing_lost`), which the kinds' check refuses.
    """
    if saved_kinds is None or sorted(saved_kinds) != sorted(face.scalars):
        return False
    return int(np.asarray(values[saved_kinds.index("iteration")])) == 0


def _load_fresh(face, values, saved_kinds):
    """Loads a state saved before build (`_saved_unbuilt`) as a fresh
    optimizer's: the learning rate and step count 0 now; built, every
    other value as build makes it (the beta products ones, the rest
    zeros: codes and scales of zero are the zero state), all or nothing.
    Returns the state left pending: None."""
    if not face.built:
        assign_scalars(face.scalars, values, saved_kinds)
        return None
    saved, mine = dict(zip(saved_kinds, values)), kinds(face)
    assign(face, [saved[kind] if kind in saved else np.full(
        tuple(entry.shape), 1 if kind in BETA_POWERS else 0, dtype_of(entry))
        for entry, kind in zip(face.entries, mine)], mine)
    return None


def assign_pending(face, pending):
    """Assigns a state loaded before build (None: nothing), at build.

    Build may run inside a traced function: TensorFlow builds an
    optimizer on its first `apply`, inside the `tf.function` of the train
    step; the values are then assigned eagerly (`tf.init_scope`), once,
    not as ops of the traced step.
    """
    if pending is None:
        _check_nothing_lost(face)
        return
    if isinstance(pending, list):  # pickled by 0.1.0: values only
        pending = (pending, None)
    if len(pending) > 2:  # (values, kinds[, format record])
        check_format(face, pending[2])  # per variable, now they are known
    pending = pending[:2]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            assign(face, *pending, skip_scalars=True)
    else:
        assign(face, *pending, skip_scalars=True)


def _check_nothing_lost(face):
    """Refuses a build at a step count > 0 with no state to assign.

    Keras's `set_state_tree` (and so Orbax checkpoints, and
    `load_model` of an Orbax folder) assigns only the variables that
    exist: into an unbuilt optimizer, the step count and none of the
    moments, without a word (keras Adam alike). Training on would restart
    m and v from zero at step n, so the build fails instead, naming the
    fix. Where the count is not concrete (built inside a JAX trace) the
    check cannot run and is skipped. A state that the slots received as
    they were made is not lost: `tf.train.Checkpoint` restores an unbuilt
    optimizer's slots at their creation (found by review: the check
    refused that resume).
    """
    count = _eager_count(face.scalars["iteration"])
    if count and not _restored_at_creation(face):
        raise ValueError(
            f"Optimizer '{face.name}' is being built at step {count} with "
            "no state to restore: its step count was loaded while it was "
            "unbuilt by a route that sets only existing variables (Keras's "
            "set_state_tree, which Orbax checkpoints use), and its moments "
            "were dropped. Build it first (`optimizer.build(model."
            "trainable_variables)`), then load; or load a .keras or "
            ".weights.h5 file, which keeps the state until build.")


def _restored_at_creation(face):
    """Whether any slot of the just-built state holds a non-zero value."""
    slots = [v for v, kind in zip(face.entries, kinds(face))
             if kind not in face.scalars]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            values = numpy_values(slots)
    else:
        values = numpy_values(slots)
    return any(np.any(value != 0) for value in values)


def _eager_count(variable):
    """`variable`'s integer value, or None inside a JAX trace."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():  # build may run inside the train step's trace
            return int(variable.value.numpy())
    value = variable.value
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.core.Tracer):
            return None
    return int(keras.ops.convert_to_numpy(value))


def _mismatch(name, extra, missing):
    parts = []
    if extra:
        parts.append(f"the saved state has {', '.join(extra)}, which this "
                     "optimizer does not keep")
    if missing:
        parts.append(f"this optimizer keeps {', '.join(missing)}, which the "
                     "saved state lacks")
    return (
        f"Cannot load the state of optimizer '{name}': "
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

