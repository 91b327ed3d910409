"""An independent float64 NumPy implementation of Adam (Kingma & Ba, 2015).

Written from Algorithm 1 of the paper (and the end of its Section 2 for the
"epsilon hat" form), not from the package, so that the tests compare two
separate implementations. Everything is computed in float64.
"""

import numpy as np


class ReferenceAdam:
    """Algorithm 1 with the options AdamPlus documents, in float64.

    `step(params, grads, lr)` updates a list of float64 arrays in place.
    """

    def __init__(self, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 epsilon_mode="paper", amsgrad=False, bias_correction=True,
                 adamax=False, nesterov=False,
                 weight_decay=None, weight_decay_mode="decoupled",
                 decay_mask=None, round_state=None, state_bits=None):
        self.b1_spec, self.b2_spec, self.eps = beta_1, beta_2, epsilon
        self.p1 = self.p2 = 1.0
        self.epsilon_mode = epsilon_mode
        self.amsgrad = amsgrad
        self.bias_correction = bias_correction
        self.adamax, self.nesterov = adamax, nesterov
        self.wd = weight_decay or 0.0
        self.wd_mode = weight_decay_mode
        self.decay_mask = decay_mask
        # Rounds m, v, v_max as they are stored, after the step used them.
        self.round_state = round_state
        # Or stores them block-wise in 8 or 4 bits (m signed, v unsigned).
        self.state_bits = state_bits
        self.t = 0
        self.m = self.v = self.v_max = None

    def _betas(self):
        """Betas of step self.t; a callable beta is called with t - 1."""
        def at(beta, step):
            return float(beta(step)) if callable(beta) else beta
        return (at(self.b1_spec, self.t - 1), at(self.b2_spec, self.t - 1),
                at(self.b1_spec, self.t))

    def step(self, params, grads, lr):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
            self.v_max = [np.zeros_like(p) for p in params]
        self.t += 1
        self.b1, self.b2, b1_next = self._betas()
        # Bias correction: 1 - the product of the betas used so far.
        self.p1, self.p2 = self.p1 * self.b1, self.p2 * self.b2
        for i, (p, g) in enumerate(zip(params, grads)):
            g = np.asarray(g, np.float64)
            # A callable weight decay is called with the 0-based step.
            wd = float(self.wd(self.t - 1)) if callable(self.wd) else self.wd
            decays = wd and (self.decay_mask is None or self.decay_mask[i])
            if decays and self.wd_mode == "l2":
                g = g + wd * p
            elif decays and self.wd_mode == "decoupled":
                p -= lr * wd * p
            elif decays and self.wd_mode == "decoupled_unscaled":
                p -= wd * p
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            if self.adamax:
                # Algorithm 2: the exponentially weighted infinity norm.
                self.v[i] = np.maximum(self.b2 * self.v[i], np.abs(g))
            else:
                self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            self.v_max[i] = np.maximum(self.v_max[i], self.v[i])
            v = self.v_max[i] if self.amsgrad else self.v[i]
            c1 = 1 - self.p1 if self.bias_correction else 1.0
            c2 = 1 - self.p2 if self.bias_correction else 1.0
            if self.nesterov:
                # Dozat (2016): the momentum one step ahead, bias-corrected.
                c1_next = (1 - self.p1 * b1_next if self.bias_correction
                           else 1.0)
                m_hat = (self.b1 * self.m[i] / c1_next
                         + (1 - self.b1) * g / c1)
            else:
                m_hat = self.m[i] / c1
            if self.adamax:
                p -= lr * np.divide(m_hat, v, out=np.zeros_like(v),
                                    where=v > 0)
            elif self.nesterov and self.epsilon_mode == "paper":
                p -= lr * m_hat / (np.sqrt(v / c2) + self.eps)
            elif self.nesterov:
                p -= lr * np.sqrt(c2) * m_hat / (np.sqrt(v) + self.eps)
            elif self.epsilon_mode == "paper":
                m_hat, v_hat = self.m[i] / c1, v / c2
                p -= lr * m_hat / (np.sqrt(v_hat) + self.eps)
            else:
                alpha_t = lr * np.sqrt(c2) / c1
                p -= alpha_t * self.m[i] / (np.sqrt(v) + self.eps)
            if self.round_state is not None:
                for state in (self.m, self.v, self.v_max):
                    state[i] = self.round_state(state[i])
            if self.state_bits is not None:
                for state, signed in ((self.m, True), (self.v, False),
                                      (self.v_max, False)):
                    state[i] = reference_dequantize(*reference_quantize(
                        state[i], signed, self.state_bits), signed,
                        self.state_bits)
        return params


def run_reference(config, params, grad_steps, lr_of_step=None,
                  round_theta=None, round_state=None, state_bits=None):
    """Runs `ReferenceAdam(**config)` over a list of per-step gradient lists.

    `lr_of_step(t)` gives the learning rate at step t = 0, 1, ...; by default
    the constant `config["learning_rate"]`. `round_theta(array)` and
    `round_state(array)`, if given, round the parameters and m, v (v_max)
    to their storage dtype after every step (half precisions: each step is
    computed exactly from the stored values, then stored rounded);
    `state_bits` (8 or 4) stores m, v (v_max) block-wise quantized
    instead (`reference_quantize`).
    """
    config = dict(config)
    lr = config.pop("learning_rate", 0.001)
    ref = ReferenceAdam(**config, round_state=round_state,
                        state_bits=state_bits)
    params = [np.array(p, np.float64) for p in params]
    for t, grads in enumerate(grad_steps):
        ref.step(params, grads, lr_of_step(t) if lr_of_step else lr)
        if round_theta is not None:
            for p in params:
                p[...] = round_theta(p)
    return params


def run_reference_average(config, params, grad_steps, decay,
                          state_bits=None):
    """Like `run_reference`, also returning the Section 7.2 average.

    theta_bar = decay * theta_bar + (1 - decay) * theta after every step,
    theta_bar_0 = 0; returns (params, theta_bar / (1 - decay**t)).
    """
    config = dict(config)
    lr = config.pop("learning_rate", 0.001)
    ref = ReferenceAdam(**config, state_bits=state_bits)
    params = [np.array(p, np.float64) for p in params]
    averages = [np.zeros_like(p) for p in params]
    for grads in grad_steps:
        ref.step(params, grads, lr)
        averages = [decay * a + (1 - decay) * p
                    for a, p in zip(averages, params)]
    t = len(grad_steps)
    return params, [a / (1 - decay**t) for a in averages]


# ------------------------------------------------ low-bit block-wise state --
# 8 bits: Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
# (ICLR 2022, Section 2): blocks of 256 elements, each scaled by its absmax
# and each value stored as the index of the nearest entry of a "dynamic
# tree" map (bitsandbytes' create_dynamic_map: per decimal exponent 10**-6
# ... 10**0, evenly spaced fractions in [0.1, 1], more of them for larger
# exponents; m signed, v unsigned).
# 4 bits: torchao's Adam4bit (Li et al., "Memory Efficient Optimizers with
# 4-bit States", NeurIPS 2023): blocks of 128; m on the same construction
# with 3 exponents (10**-2 ... 10**0, 16 entries), v on the 16 entries
# k / 16, k = 1 ... 16 (no zero); two codes a byte, the first element in
# the high nibble. Here all in float64.

BLOCK = {8: 256, 4: 128}


def reference_dynamic_map(signed, bits=8):
    """The 2**bits dynamic map entries, ascending, in float64."""
    entries = {0.0, 1.0}
    for exponent in range(2 - bits, 1):
        count = 2 ** (exponent + bits - 2) * (1 if signed else 2)
        fractions = 0.1 + 0.9 * (np.arange(count) + 0.5) / count
        for value in fractions * 10.0 ** exponent:
            entries.add(float(value))
            if signed:
                entries.add(-float(value))
    table = np.array(sorted(entries))
    assert table.shape == (2 ** bits,)
    return table


def reference_map(signed, bits=8):
    """The map of a format. v's has no zero: 4-bit v's is linear; 8-bit
    v's lowest entry is 0.55e-7 (one entry for the decade below 1e-6) in
    place of the dynamic map's 0."""
    if bits == 4 and not signed:
        return np.arange(1, 17) / 16.0
    table = reference_dynamic_map(signed, bits)
    if not signed:
        table[0] = 0.55e-7
    return table


def reference_quantize(values, signed, bits=8):
    """`(codes, scales)`: per block of the flattened `values` its absmax,
    and per value the index of the nearest map entry to value / absmax
    (the larger one on a tie); an all-zero block has scale 0. The codes
    have the shape of `values` (unpacked)."""
    table, block = reference_map(signed, bits), BLOCK[bits]
    flat = np.asarray(values, np.float64).reshape(-1)
    codes = np.zeros(flat.shape, np.int64)
    scales = []
    for start in range(0, flat.size, block):
        piece = flat[start:start + block]
        scale = np.abs(piece).max()
        scales.append(scale)
        normalized = piece / scale if scale > 0 else np.zeros_like(piece)
        distance = np.abs(normalized[:, None] - table[None, :])
        # argmin takes the first minimum: search the reversed table.
        codes[start:start + block] = (table.size - 1 - np.argmin(
            distance[:, ::-1], 1))
    return codes.reshape(np.shape(values)), np.array(scales)


def reference_dequantize(codes, scales, signed, bits=8):
    """map[code] * the scale of the code's block, in float64 (unpacked
    codes)."""
    table = reference_map(signed, bits)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    per_value = np.repeat(np.asarray(scales, np.float64),
                          BLOCK[bits])[:flat.size]
    return (table[flat] * per_value).reshape(np.shape(codes))


def reference_pack(codes):
    """4-bit codes two a byte: element 2i in the high nibble of byte i."""
    flat = [int(c) for c in np.asarray(codes).reshape(-1)]
    if len(flat) % 2:
        flat.append(0)
    return np.array([16 * hi + lo for hi, lo in zip(flat[::2], flat[1::2])],
                    np.uint8)


def reference_unpack(packed, shape):
    """The codes (int64) of `shape` in `reference_pack`'s bytes."""
    flat = []
    for byte in np.asarray(packed).reshape(-1):
        flat.extend((int(byte) >> 4, int(byte) & 15))
    size = int(np.prod(shape))
    return np.array(flat[:size], np.int64).reshape(shape)
