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


KEYS = [(bits, signed) for bits in BLOCKS for signed in (True, False)]
TABLES = {key: table(*key) for key in KEYS}
MIDPOINTS = {key: midpoints(TABLES[key]) for key in KEYS}


def blocks(shape, bits=8):
    """The number of blocks (scales) of a tensor of `shape`."""
    return -(-storage.size(shape) // BLOCKS[bits])


def encode(value, signed, bits=8):
    """`(codes, scales)` of a float32 `value`: uint8 codes (8 bits: of its
    shape; 4 bits: two a byte, `pack`) and one float32 absmax per block of
    its flattened elements."""
    shape, block = tuple(value.shape), BLOCKS[bits]
    n = storage.size(shape)
    count = blocks(shape, bits)
    flat = ops.reshape(value, (-1,))
    if count * block != n:
        flat = ops.pad(flat, [(0, count * block - n)])
    grid = ops.reshape(flat, (count, block))
    scales = ops.max(ops.abs(grid), axis=1)
    safe = ops.where(ops.greater(scales, 0.0), scales,
                     ops.ones_like(scales))
    normalized = ops.reshape(ops.divide(grid, safe[:, None]), (-1,))
    if count * block != n:
        normalized = normalized[:n]
    codes = nearest(normalized, MIDPOINTS[bits, signed])
    if bits == 4:
        return pack(codes), scales
    return ops.reshape(ops.cast(codes, "uint8"), shape), scales


def pack(codes):
    """4-bit `codes` (int32, 1-D) two a byte, the first in the high
    nibble: uint8 of shape (ceil(n/2),), an odd last nibble 0."""
    if int(codes.shape[0]) % 2:
        codes = ops.pad(codes, [(0, 1)])
    pairs = ops.reshape(codes, (-1, 2))
    return ops.cast(ops.add(ops.multiply(pairs[:, 0], 16), pairs[:, 1]),
                    "uint8")


def unpack(packed, n):
    """The `n` 4-bit codes (int32, 1-D) of `pack`'s bytes."""
    wide = ops.cast(packed, "int32")
    codes = ops.reshape(ops.stack([ops.floor_divide(wide, 16),
                                   ops.mod(wide, 16)], axis=1), (-1,))
    return codes if int(codes.shape[0]) == n else codes[:n]


def nearest(normalized, mids):
    """The index of the nearest map entry to each of `normalized` (1-D),
    a tie to the larger: the number of midpoints `mids` <= the value.

    A branchless binary search (log2 of the map's size gathers, as
    torchao's `quantize_8bit_with_qmap`): under XLA (JAX, TensorFlow) 4 to
    15 times faster than `ops.searchsorted` on a million values (8 bits);
    torch's own `searchsorted` is the faster there (eager gathers are 8
    times slower).
    """
    size = len(mids) + 1
    mids = ops.convert_to_tensor(mids)
    if keras.backend.backend() == "torch":
        return ops.searchsorted(mids, normalized, side="right")
    codes = ops.zeros(normalized.shape, "int32")
    step = size // 2
    while step:
        up = ops.add(codes, step)
        codes = ops.where(ops.greater_equal(
            normalized, ops.take(mids, ops.subtract(up, 1))), up, codes)
        step //= 2
    return codes


def decode(codes, scales, dtype, signed, shape=None, bits=8):
    """`table[code] * scale` of each element, in `dtype`, of `shape`
    (8 bits: by default the codes')."""
    shape = tuple(codes.shape) if shape is None else tuple(shape)
    n = storage.size(shape)
    flat = ops.reshape(codes, (-1,))
    indices = unpack(flat, n) if bits == 4 else ops.cast(flat, "int32")
    values = ops.take(ops.convert_to_tensor(TABLES[bits, signed]), indices)
    per_element = ops.repeat(scales, BLOCKS[bits])
    if int(per_element.shape[0]) != n:
        per_element = per_element[:n]
    result = ops.reshape(ops.multiply(values, per_element), shape)
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

