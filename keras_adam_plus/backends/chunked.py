"""A large low-bit variable's step, chunk by chunk, in one loop: the code
of `jax_chunked` (JAX) and `tf_chunked` (TensorFlow under XLA).

XLA on a CPU runs the generic step of block-wise state
(`keras_adam_plus.lowbit`) over the whole variable: it never fuses a
producer into a reduction, so the updated m and v are written to buffers of
the variable's size between each block's absmax and the encoding, fresh
buffers every step, whose page faults cost about as much as the step's
arithmetic (and whose size is several times the 8-bit state's).
Here the same code, `rule.step` over the format's
`decode_scaled` and `encode_scaled`, runs on equal chunks of about
`TARGET` elements (whole blocks of either bit width; `layout`) inside one
loop (`ops.fori_loop`) that updates theta in place and writes the new codes
and scales chunk by chunk (`ops.slice_update` of the loop's carry, XLA's
dynamic-update-slice); each chunk's intermediates stay in cache and are
reused every iteration, and each of its fusions is large enough for XLA to
split over the cores. The few elements after the last chunk (the short
last block among them) take one more call of the same chunk step.

Its results are written through the store, so a guarded step
(`skip_nonfinite`) keeps the old values on a bad step, as the generic one.

Every chunk is elementwise the generic step (blocks are independent, the
absmax is exact), but XLA contracts a multiply and an add where its fusions
allow, and it fuses this program differently. In one compiled program
(`fit`, a jitted `stateless_apply`), in every cell of
`tests/test_low_bit.py::test_every_chunk_layout_and_mode_is_the_generic_step`
(where the last chunk ends, the modes, both formats, the weights' dtypes),
codes, scales and every other variable are the generic step's bit for bit,
and theta differs by at most an ulp of an intermediate (about 1e-7 where
Nesterov's numerator cancels; the temporal average and the EMA, computed
from theta, follow it). With gradient clipping (`clipnorm`,
`global_clipnorm`) some scales differ by an ulp too (a review found the
clipped gradient's multiply folded differently).
"""

from keras import ops

from keras_adam_plus import rule, storage

# Elements a loop iteration, about: large enough that XLA's CPU code splits
# an iteration's fusions over the cores (it runs a small chunk's on one),
# small enough that a chunk's temporaries stay in cache (docs/speed.md has
# the sizes measured). A variable is cut into `layout`'s equal chunks.
TARGET = 131072
# The least size `layout` cuts (two chunks of 16,384).
MIN_SIZE = 32768
# Variables of this many elements or more take the generic step: the
# loop's offsets are int32 (TensorFlow; JAX without x64).
MAX_SIZE = 2 ** 31
# A chunk is whole blocks of both bit widths (256 and 128: an even count,
# 4-bit codes being two a byte).
GRAIN = 256
KINDS = ("m", "v", "v_max")


def handles(step, variables, index, min_size):
    """Whether a chunked path may take the step of `variables` (one: a
    group's flat slots are never low-bit) of position `index`: block-wise
    state of at least `min_size` elements (under `MAX_SIZE`), not forced
    generic."""
    if len(variables) != 1 or step.plan.generic_only:
        return False
    return storage.large_blockwise(step.store, index, variables[0],
                                   min_size) and (
        storage.size(variables[0].shape) < MAX_SIZE)


def describe(variables, store, min_size, how):
    """What `AdamPlus.fast_path` adds where a group keeps low-bit state:
    how many variables of at least `min_size` elements take the loop
    (built; None for none), or which would (before build); `how` ends
    the line (the module, where it runs)."""
    loop = f"one loop each over chunks of about {TARGET}"
    if store is None:
        return (f"low-bit variables of {min_size} elements or more: {loop}"
                f" {how}")
    count = sum(1 for i, v in enumerate(variables) if storage.large_blockwise(
        store, i, v, min_size))
    if not count:
        return None
    return (f"{count} low-bit variable{'s' if count > 1 else ''} of "
            f"{min_size} elements or more: {loop} {how}")


def run(step, grads, variables, slots, index, program):
    """The rule on one low-bit variable, chunk by chunk, through
    `program(hyper, decays, fmt, dtype, kinds)`, a function of `(theta,
    gradient, ((codes, scales) per kind), scalars)` (`traced`, or a
    compiled one); True (taken)."""
    variable, store = variables[0], step.store
    dtype = rule.compute_dtype(storage.dtype_of(variable))
    present = [slot for slot in slots if slot is not None]
    kinds = tuple(kind for kind, slot in zip(KINDS, slots) if slot is not None)
    scales = [store.scale_of(slot)[0] for slot in present]
    call = program(step.plan.setting(index).hyper, step.plan.decays[index],
                   store.formats[index], dtype, kinds)
    value = ops.convert_to_tensor  # a scope's value where in one
    theta, written = call(
        value(variable), grads[0],
        tuple((value(slot), value(scale))
              for slot, scale in zip(present, scales)),
        tuple(step.scalars(dtype, step.plan.group(index))[1:]))
    store.assign(variable, theta)
    for slot, scale, (new_codes, new_scales) in zip(present, scales,
                                                     written):
        store.assign(slot, new_codes)
        store.assign(scale, new_scales)
    return True


def traced(hyper, decays, fmt, dtype, kinds):
    """`run`'s `program` where the step is traced already: `loop` itself
    (looked up at each call, so that a test can wrap it)."""
    def call(theta, gradient, tensors, scalars):
        return loop(theta, gradient, tensors, rule.Scalars(dtype, *scalars),
                    hyper, decays, fmt, dtype, kinds)

    return call


def spans(start, length, fmt):
    """Where the codes and scales of elements `start` to `start + length`
    lie: `((first byte, bytes), (first scale, scales))`, for a `start` of
    whole blocks (4-bit codes are two a byte)."""
    per_byte = 2 if fmt.bits == 4 else 1
    return ((start // per_byte, -(-length // per_byte)),
            (start // fmt.block, -(-length // fmt.block)))


def layout(n):
    """`(size, count)`: the loop's `count` chunks of `size` elements, a
    multiple of `GRAIN`, for a variable of `n >= MIN_SIZE` elements; the
    rest, under `count * (GRAIN + 1)` elements, is one more call.

    At least two chunks: XLA inlines a loop of one iteration, which then
    fuses as the generic step does, materializing the moments. Equal
    chunks rather than chunks of `TARGET` and a remainder: the call after
    the loop is straight-line code, as slow as that.
    """
    count = max(2, round(n / TARGET))
    return n // count // GRAIN * GRAIN, count


def loop(theta, gradient, tensors, scalars, hyper, decays, fmt, dtype,
          kinds):
    """theta and each kind's `(codes, scales)` after the step."""
    shape, n = tuple(theta.shape), storage.size(theta.shape)
    flat_gradient = ops.reshape(ops.cast(gradient, dtype), (-1,))
    old = tuple((ops.reshape(c, (-1,)), s) for c, s in tensors)
    # The loop reads the old codes and scales and writes new buffers: were
    # it to write into the buffers it reads, XLA (which fuses a chunk's
    # decoding into each of its consumers, theta's update among them)
    # would copy them whole every iteration to keep the old values.
    carry = (ops.reshape(theta, (-1,)),
             tuple((ops.zeros(c.shape, c.dtype), ops.zeros(s.shape, s.dtype))
                   for c, s in old))
    def chunk(start, length, carry):
        theta, new = carry
        at = spans(start, length, fmt)  # `start`: a multiple of `GRAIN`
        state = storage.TensorState(
            ops.cast(ops.slice(theta, (start,), (length,)), dtype), {
                kind: (ops.slice(codes, (at[0][0],), (at[0][1],)),
                       ops.slice(scales, (at[1][0],), (at[1][1],)))
                for kind, (codes, scales) in zip(kinds, old)},
            fmt, dtype, (length,))
        rule.step(hyper, scalars,
                  ops.slice(flat_gradient, (start,), (length,)), state,
                  decays)
        theta = ops.slice_update(theta, (start,),
                                 ops.cast(state.value, theta.dtype))
        return theta, tuple(
            (ops.slice_update(codes, (at[0][0],), state.written[kind][0]),
             ops.slice_update(scales, (at[1][0],), state.written[kind][1]))
            for kind, (codes, scales) in zip(kinds, new))

    size, count = layout(n)
    carry = ops.fori_loop(
        0, count, lambda i, carry: chunk(i * size, size, carry), carry)
    if n > count * size:
        carry = chunk(count * size, n - count * size, carry)
    theta, new = carry
    return ops.reshape(theta, shape), tuple(
        (ops.reshape(codes, tuple(was.shape)), scales)
        for (codes, scales), (was, _) in zip(new, tensors))
