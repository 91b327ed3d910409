"""8-bit block-wise optimizer state (`state_format="8bit"`).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
(https://arxiv.org/abs/2110.02861), with bitsandbytes >= 0.44's and
torchao's block of 256 elements:

- each slot of a quantized variable is `uint8` codes of the variable's
  shape plus one float32 scale (the block's absmax) per block of 256
  consecutive elements of the flattened tensor (the last block may be
  shorter: nothing is padded, no tensor falls back for its size);
- a code `c` of a block of scale `s` stands for `table[c] * s`, where the
  table is the dynamic ("dynamic tree") map of bitsandbytes'
  `create_dynamic_map`: signed for m, unsigned for v, v_max and AdaMax's u
  (Section 2.2; a linear map for v diverges);
- encoding takes each block's absmax as its scale, divides the block by it
  (an all-zero block keeps scale 0 and the code of 0) and keeps the
  nearest table entry, a tie going to the larger one (torchao's rounding;
  `nearest`);
- a step decodes to float32, updates in float32 and encodes once
  (`storage.read`/`storage.put`).

Variables under `min_size` elements, float64 ones and those with a
distribution layout keep the native format (`Blockwise.keeps`).
"""

import keras
import numpy as np
from keras import ops

from keras_adam_plus import storage

BLOCK = 256


def dynamic_map(signed):
    """The 256 entries of bitsandbytes' `create_dynamic_map(signed)`.

    7 exponent levels 10**-6 ... 10**0; level i holds the midpoints of
    `linspace(0.1, 1, k + 1)` scaled by 10**(i - 6), k = 2**i (signed: with
    both signs) or 2**(i + 1) (unsigned); plus 0 and 1. Computed in float64
    and rounded once to float32 (bitsandbytes computes in float32, so an
    entry may differ from its table in the last bit), sorted ascending.
    """
    data = [0.0, 1.0]
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, k + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)
        data.extend(means)
        if signed:
            data.extend(-means)
    table = np.sort(np.asarray(data, np.float64)).astype(np.float32)
    assert table.shape == (256,)
    return table


def midpoints(table):
    """The 255 thresholds between neighbouring entries, in float32."""
    wide = table.astype(np.float64)
    return ((wide[:-1] + wide[1:]) / 2.0).astype(np.float32)


TABLES = {signed: dynamic_map(signed) for signed in (True, False)}
MIDPOINTS = {signed: midpoints(TABLES[signed]) for signed in (True, False)}


def blocks(shape):
    """The number of blocks (scales) of a tensor of `shape`."""
    return -(-storage.size(shape) // BLOCK)


def encode(value, signed):
    """`(codes, scales)` of a float32 `value`: uint8 codes of its shape,
    one float32 absmax per block of 256 of its flattened elements."""
    shape = tuple(value.shape)
    n = storage.size(shape)
    count = blocks(shape)
    flat = ops.reshape(value, (-1,))
    if count * BLOCK != n:
        flat = ops.pad(flat, [(0, count * BLOCK - n)])
    grid = ops.reshape(flat, (count, BLOCK))
    scales = ops.max(ops.abs(grid), axis=1)
    safe = ops.where(ops.greater(scales, 0.0), scales,
                     ops.ones_like(scales))
    normalized = ops.reshape(ops.divide(grid, safe[:, None]), (-1,))
    if count * BLOCK != n:
        normalized = normalized[:n]
    codes = nearest(normalized, signed)
    return ops.reshape(ops.cast(codes, "uint8"), shape), scales


def nearest(normalized, signed):
    """The index of the nearest map entry to each of `normalized` (1-D),
    a tie to the larger: the number of midpoints <= the value.

    A branchless binary search (8 gathers, as torchao's
    `quantize_8bit_with_qmap`): under XLA (JAX, TensorFlow) 4 to 15 times
    faster than `ops.searchsorted` on a million values; torch's own
    `searchsorted` is the faster there (eager gathers are 8 times slower).
    """
    mids = ops.convert_to_tensor(MIDPOINTS[signed])
    if keras.backend.backend() == "torch":
        return ops.searchsorted(mids, normalized, side="right")
    codes = ops.zeros(normalized.shape, "int32")
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        up = ops.add(codes, step)
        codes = ops.where(ops.greater_equal(
            normalized, ops.take(mids, ops.subtract(up, 1))), up, codes)
    return codes


def decode(codes, scales, dtype, signed):
    """`table[codes] * scale` of each element, in `dtype`."""
    shape = tuple(codes.shape)
    n = storage.size(shape)
    values = ops.take(ops.convert_to_tensor(TABLES[signed]),
                      ops.cast(ops.reshape(codes, (-1,)), "int32"))
    per_element = ops.repeat(scales, BLOCK)
    if int(per_element.shape[0]) != n:
        per_element = per_element[:n]
    result = ops.reshape(ops.multiply(values, per_element), shape)
    return result if dtype == "float32" else ops.cast(result, dtype)


class Blockwise(storage.Format):
    """`state_format="8bit"`: uint8 codes and float32 block scales.

    A variable of at least `min_size` elements keeps each moment slot as
    codes (`slot_dtype` "uint8") and a scale slot of `blocks(shape)`
    float32 values (`scale_shape`); the others keep the native format.
    """

    name = "8bit"
    native = False
    scaled = True

    def __init__(self, min_size=4096):
        self.min_size = min_size

    def keeps(self, variable):
        """Why `variable` keeps the native format, or None (quantized)."""
        dtype = storage.dtype_of(variable)
        if dtype == "float64":
            return "float64"
        if getattr(variable, "_layout", None) is not None:
            return "a distribution layout"
        if storage.size(variable.shape) < self.min_size:
            return f"under {self.min_size} elements"
        return None

    def scale_shape(self, variable):
        if self.keeps(variable) is not None:
            return None
        return (blocks(variable.shape),)

    def slot_dtype(self, variable, moment_dtype):
        if self.keeps(variable) is None:
            return "uint8"
        return storage.state_dtype(variable, moment_dtype)

    def decode_scaled(self, codes, scales, dtype, signed):
        return decode(codes, scales, dtype, signed)

    def encode_scaled(self, value, signed):
        return encode(ops.cast(value, "float32"), signed)

    def describe(self, variables):
        """One line: how many variables are quantized, and why not the
        others."""
        reasons = {}
        for variable in variables:
            reason = self.keeps(variable)
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
        quantized = len(variables) - sum(reasons.values())
        kept = "; ".join(f"{n} {why}" for why, n in reasons.items())
        return (f"state_format=8bit (blocks of {BLOCK}, min size "
                f"{self.min_size}): {quantized} of {len(variables)} "
                "variables quantized" + (
                    f", the others keep the native format ({kept})"
                    if kept else ""))


# The quantized formats by `state_format` name: each a class taking the
# `state_format_min_size`. A format joins by its name here and in
# `validation.STATE_FORMATS`.
FORMATS = {"8bit": Blockwise}


def format_of(state_format, min_size):
    """The `storage.Format` of a `state_format` argument (a new one: a
    format may be a group's, `variable_groups`)."""
    if state_format == "native":
        return storage.NATIVE
    return FORMATS[state_format](min_size)
