"""Block-wise low-bit optimizer state (`state_format="8bit"`, `"4bit"`).

Each moment slot of a quantized variable is codes plus one float32 scale
(the block's absmax) per block of consecutive elements of the flattened
tensor (the last block may be shorter: nothing is padded, no tensor falls
back for its size). A code `c` of a block of scale `s` stands for
`table[c] * s`.

- `"8bit"`: Dettmers et al., "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022 (https://arxiv.org/abs/2110.02861), with
  bitsandbytes >= 0.44's and torchao's block of 256: uint8 codes of the
  variable's shape on the dynamic ("dynamic tree") map of bitsandbytes'
  `create_dynamic_map`, signed for m, unsigned for v, v_max and AdaMax's
  u (Section 2.2; a linear map for v diverges), v's without its zero
  (`table`).
- `"4bit"`: torchao's `Adam4bit` (Li et al., "Memory Efficient Optimizers
  with 4-bit States", NeurIPS 2023, https://arxiv.org/abs/2309.01507,
  without its rank-1 normalization, as torchao): blocks of 128; m on the
  16-entry signed dynamic map (`create_dynamic_map(True, 3, 4)`), v, v_max
  and u on the linear map k/16, k = 1..16, without zero (Section 4.1: a
  zero code makes 1/sqrt(v) blow up); two codes per uint8, the first in
  the high nibble (torchao's packing), in a slot of ceil(n/2) bytes.
  Slots start at zeros: code 0 (-0.8875 for m, 1/16 for v) times a zero
  scale is 0, so the all-zero start state is the zero state.

Encoding takes each block's absmax as its scale, divides the block by it
(an all-zero block keeps scale 0) and keeps the nearest table entry, a tie
going to the larger one (torchao's rounding; `nearest`). A step decodes
to float32, updates in float32 and encodes once (`storage.read`/`put`).
Variables under `min_size` elements, float64 ones and those with a
distribution layout keep the native format (`Blockwise.keeps`).
"""

import keras
import numpy as np
from keras import ops

from keras_adam_plus import storage

BLOCKS = {8: 256, 4: 128}  # elements per scale, by bits per code
FORMATS = {"8bit": 8, "4bit": 4}


def dynamic_map(signed, bits=8):
    """The 2**bits entries of `create_dynamic_map(signed, bits - 1, bits)`
    (bitsandbytes' for 8 bits, torchao's generalization for 4).

    `bits - 1` exponent levels 10**-(bits - 2) ... 10**0; level i holds
    the midpoints of `linspace(0.1, 1, k + 1)` scaled by its power of ten,
    k = 2**i (signed: with both signs) or 2**(i + 1) (unsigned); plus 0
    and 1. Computed in float64 and rounded once to float32 (bitsandbytes
    and torchao compute in float32, so an entry may differ from their
    tables in the last bit), sorted ascending.
    """
    data = [0.0, 1.0]
    for i in range(bits - 1):
        k = 2 ** i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, k + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - bits + 2)
        data.extend(means)
        if signed:
            data.extend(-means)
    table = np.sort(np.asarray(data, np.float64)).astype(np.float32)
    assert table.shape == (2 ** bits,)
    return table


# 8-bit v's lowest entry, in place of bitsandbytes' 0: the one entry (0.55)
# of a seventh decade below 1e-6.
V_FLOOR_8BIT = 0.55e-7


def table(bits, signed):
    """The map of codes of `bits` bits. v's has no zero (Li et al. 2023,
    Section 4.1: a v read as 0 under an m that is not makes the step
    m / epsilon): 4 bits, linear (torchao's `linspace(0, 1, 17)[1:]`,
    exact in float32); 8 bits, bitsandbytes' dynamic map with its 0
    replaced by `V_FLOOR_8BIT` (with the 0, a v under 1.6e-7 of its
    block's largest read as 0 and steps of thousands of times float32
    state's diverged training)."""
    if bits == 4 and not signed:
        return (np.arange(1, 17) / 16.0).astype(np.float32)
    entries = dynamic_map(signed, bits)
    if not signed:
        entries[0] = np.float32(V_FLOOR_8BIT)
    return entries


def midpoints(entries):
    """The thresholds between neighbouring entries, in float32."""
    wide = entries.astype(np.float64)
    return ((wide[:-1] + wide[1:]) / 2.0).astype(np.float32)


# `nearest` finds a code by the top bits of the value's float32 pattern: the
# sign, the exponent and the first `LOOKUP_MANTISSA` mantissa bits name a
# bucket (2**LOOKUP_MANTISSA of them a binade), in which at most one
# midpoint falls (`lookup` asserts it): the code is the bucket's first code,
# plus 1 at or above that midpoint. Two gathers from a small table in place
# of a search over the map: exact, and a few integer operations a value.
LOOKUP_MANTISSA = 8
LOOKUP_SHIFT = 23 - LOOKUP_MANTISSA
LOOKUP_MASK = (1 << (32 - LOOKUP_SHIFT)) - 1  # the key of a pattern


def lookup(mids):
    """`(first, threshold)` per bucket key of `nearest`: int32 codes and
    float32 midpoints (NaN, which no value reaches, where the bucket holds
    none)."""
    keys = np.arange(LOOKUP_MASK + 1, dtype=np.int64)
    bounds = [(keys << LOOKUP_SHIFT) | low for low in
              (0, (1 << LOOKUP_SHIFT) - 1)]
    ends = [np.asarray(b, np.uint32).view(np.float32) for b in bounds]
    negative = keys >> (31 - LOOKUP_SHIFT) == 1
    # The bucket's least and largest value (a negative bucket's least has
    # the larger pattern); NaN buckets count as their signed infinity.
    infinity = np.where(negative, -np.inf, np.inf)
    first, last = (np.searchsorted(mids, np.where(np.isnan(end), infinity,
                                                  end), side="right")
                   for end in (np.where(negative, ends[1], ends[0]),
                               np.where(negative, ends[0], ends[1])))
    assert np.all((last - first >= 0) & (last - first <= 1)), (
        "a bucket of `nearest` holds two midpoints")
    threshold = np.where(last > first,
                         mids[np.minimum(first, len(mids) - 1)],
                         np.float32(np.nan)).astype(np.float32)
    return first.astype(np.int32), threshold


KEYS = [(bits, signed) for bits in BLOCKS for signed in (True, False)]
TABLES = {key: table(*key) for key in KEYS}
MIDPOINTS = {key: midpoints(TABLES[key]) for key in KEYS}
LOOKUPS = {key: lookup(MIDPOINTS[key]) for key in KEYS}
# Every table `gather` reads, by name: `("map", bits, signed)` (a code's
# entry), `("first", ...)` and `("threshold", ...)` (`lookup`'s).
NAMED = {}
for _key in KEYS:
    NAMED[("map",) + _key] = TABLES[_key]
    NAMED[("first",) + _key], NAMED[("threshold",) + _key] = LOOKUPS[_key]


def blocks(shape, bits=8):
    """The number of blocks (scales) of a tensor of `shape`."""
    return -(-storage.size(shape) // BLOCKS[bits])


def grids(flat, block):
    """1-D `flat` as grids of rows of `block` elements: its whole blocks,
    `(n // block, block)`, and then its partial last block, `(1, rest)`
    (each only where it has elements; an empty `flat` is one empty grid).

    No padding to whole blocks: torch 2.13's inductor (CPU) miscompiles a
    padded grid whose padding is cut off again (the last block's values
    garbage; `tests/test_low_bit.py::test_a_compiled_step_is_the_eager_one`),
    and a concatenation of zeros is one more tensor of the variable's size
    on every backend.
    """
    n = int(flat.shape[0])
    whole = n // block * block
    parts = [ops.reshape(flat[:whole], (n // block, block))] if (
        whole or not n) else []
    if whole != n:
        parts.append(ops.reshape(flat[whole:], (1, n - whole)))
    return parts


def joined(parts):
    """The 1-D concatenation of `parts` (flattened), the one as it is."""
    flat = [ops.reshape(p, (-1,)) for p in parts]
    return flat[0] if len(flat) == 1 else ops.concatenate(flat)


def encode(value, signed, bits=8):
    """`(codes, scales)` of a float32 `value`: uint8 codes (8 bits: of its
    shape; 4 bits: two a byte, `pack`) and one float32 absmax per block of
    its flattened elements."""
    shape = tuple(value.shape)
    if not storage.size(shape):  # no blocks (keras's TensorFlow `max`
        # refuses an empty tensor)
        return (ops.zeros(shape if bits == 8 else (0,), "uint8"),
                ops.zeros((0,), "float32"))
    codes, scales = [], []
    for grid in grids(ops.reshape(value, (-1,)), BLOCKS[bits]):
        # `amax`: keras's torch `max` reads `.values` off its result, a
        # graph break under `torch.compile`.
        scale = ops.amax(ops.abs(grid), axis=1)
        safe = ops.where(ops.greater(scale, 0.0), scale,
                         ops.ones_like(scale))
        codes.append(ops.cast(nearest(ops.divide(grid, safe[:, None]),
                                      ("first", bits, signed),
                                      ("threshold", bits, signed)),
                              "uint8"))
        scales.append(scale)
    codes, scales = joined(codes), joined(scales)
    if bits == 4:
        return pack(codes), scales
    return ops.reshape(codes, shape), scales


def pack(codes):
    """4-bit `codes` (uint8, 1-D) two a byte, the first in the high
    nibble: uint8 of shape (ceil(n/2),), an odd last nibble 0 (in uint8
    throughout: 15 * 16 + 15 fits)."""
    n = int(codes.shape[0])
    parts = []
    if n // 2 or not n:
        pairs = ops.reshape(codes[:n - n % 2], (-1, 2))
        parts.append(ops.add(ops.multiply(pairs[:, 0], ops.cast(16, "uint8")),
                             pairs[:, 1]))
    if n % 2:
        parts.append(ops.multiply(codes[n - 1:], ops.cast(16, "uint8")))
    return joined(parts)


def unpack(packed, n):
    """The `n` 4-bit codes (int32, 1-D) of `pack`'s bytes."""
    wide = ops.cast(packed, "int32")
    codes = ops.reshape(ops.stack([ops.floor_divide(wide, 16),
                                   ops.mod(wide, 16)], axis=1), (-1,))
    return codes if int(codes.shape[0]) == n else codes[:n]


def nearest(normalized, first, threshold):
    """The index of the nearest map entry to each of `normalized`
    (float32), a tie to the larger: the number of midpoints <= the value,
    by the bucket tables `first` and `threshold` of `lookup` (`gather`'s
    names or the arrays).

    The same codes as a search over the midpoints (a binary search, as
    torchao's `quantize_8bit_with_qmap`, or `searchsorted`), from two
    gathers a value rather than one a halving of the map; NaN reads as
    its signed infinity.
    """
    bits = ops.view(normalized, "int32")
    key = ops.bitwise_and(ops.right_shift(bits, LOOKUP_SHIFT), LOOKUP_MASK)
    above = ops.greater_equal(normalized, gather(threshold, key))
    return ops.add(gather(first, key), ops.cast(above, "int32"))


_TORCH_TABLES = {}


def gather(table, indices):
    """`table[indices]` of a table named in `NAMED` (or a NumPy array)
    and int32 `indices` in range.

    On torch, a named table is converted once (`torch_tables`) and read by
    `index_select` on the int32 indices as they are: keras's `take` widens
    them to int64 and wraps negative ones first (three more passes over a
    tensor of the variable's size), and `table[indices]` converts int32
    indices too. By name, not by array: inside a `torch.compile`d step a
    NumPy array is converted to a tensor on every call.
    """
    if keras.backend.backend() != "torch":
        array = NAMED[table] if isinstance(table, tuple) else table
        return ops.take(ops.convert_to_tensor(array), indices)
    import torch

    if not isinstance(table, tuple):
        tensor = ops.convert_to_tensor(table)
    else:
        if table not in _TORCH_TABLES:
            torch_tables()
        tensor = _TORCH_TABLES[table]
    return torch.index_select(tensor, 0, indices.reshape(-1)).reshape(
        indices.shape)


def torch_tables():
    """Converts every table of `gather` for torch, once: inside a
    `torch.compile`d step (ours, or Keras's `jit_compile=True`) a
    conversion from NumPy is a graph break."""
    if len(_TORCH_TABLES) == len(NAMED):
        return
    for name, array in NAMED.items():
        _TORCH_TABLES[name] = ops.convert_to_tensor(array)


def decode(codes, scales, dtype, signed, shape=None, bits=8):
    """`table[code] * scale` of each element, in `dtype`, of `shape`
    (8 bits: by default the codes')."""
    shape = tuple(codes.shape) if shape is None else tuple(shape)
    n = storage.size(shape)
    flat = ops.reshape(codes, (-1,))
    indices = unpack(flat, n) if bits == 4 else ops.cast(flat, "int32")
    # Each block times its scale by broadcasting (a repeated scale per
    # element would be one more tensor of the variable's size).
    scaled, row = [], 0
    for grid in grids(gather(("map", bits, signed), indices), BLOCKS[bits]):
        rows = int(grid.shape[0])
        scaled.append(ops.multiply(grid, scales[row:row + rows, None]))
        row += rows
    result = ops.reshape(joined(scaled), shape)
    return result if dtype == "float32" else ops.cast(result, dtype)


def format_of(state_format, min_size):
    """The `storage.Format` of a `state_format` argument (a new one: a
    format may be a group's, `variable_groups`). A format joins by its
    name in `FORMATS` and in `validation.STATE_FORMATS`."""
    if state_format == "native":
        return storage.NATIVE
    return Blockwise(min_size, FORMATS[state_format])


class Blockwise(storage.Format):
    """`state_format="8bit"` or `"4bit"`: uint8 codes, float32 scales.

    A variable of at least `min_size` elements keeps each moment slot as
    codes (`slot_dtype` "uint8", `slot_shape` its shape for 8 bits, ceil(n
    / 2) bytes for 4) and a scale slot of `blocks(shape, bits)` float32
    values (`scale_shape`); the others keep the native format.
    """

    native = False
    scaled = True

    def __init__(self, min_size=4096, bits=8):
        self.min_size, self.bits = min_size, bits
        self.name, self.block = f"{bits}bit", BLOCKS[bits]
        if keras.backend.backend() == "torch":
            torch_tables()  # before any step is compiled (`gather`)

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

    def slot_shape(self, variable):
        if self.bits == 4 and self.keeps(variable) is None:
            return (-(-storage.size(variable.shape) // 2),)
        return tuple(variable.shape)

    def scale_shape(self, variable):
        if self.keeps(variable) is not None:
            return None
        return (blocks(variable.shape, self.bits),)

    def slot_dtype(self, variable, moment_dtype):
        if self.keeps(variable) is None:
            return "uint8"
        return storage.state_dtype(variable, moment_dtype)

    def decode_scaled(self, codes, scales, dtype, signed, shape):
        return decode(codes, scales, dtype, signed, shape, self.bits)

    def encode_scaled(self, value, signed):
        return encode(ops.cast(value, "float32"), signed, self.bits)

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
        return (f"state_format={self.name} (blocks of {self.block}, min "
                f"size {self.min_size}): {quantized} of {len(variables)} "
                "variables quantized" + (
                    f", the others keep the native format ({kept})"
                    if kept else ""))

