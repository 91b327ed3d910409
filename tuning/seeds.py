"""The seeds of a search: the range of `--seed`, and the seeds derived
from it for each purpose.

keras-tuner's oracles draw trial k's values from a stream that starts at
their seed and counts up (`random_sample(seed_state)`, `seed_state += 1`),
and take seed 0 for "no seed" (`seed or random.randint(...)`). Seeds 1 and
2 would give the same trials shifted by one, and seed 0 an unseeded search.
`derive` hashes (seed, purpose) instead: every seed, 0 included, gives a
fixed, non-zero oracle seed, and neighbouring seeds give unrelated streams.
"""

import hashlib

# numpy's legacy seeding (`np.random.seed`, which `keras.utils.
# set_random_seed` and keras-tuner's Bayesian oracle call) takes [0, 2**32).
MAX_SEED = 2**32 - 1


def derive(seed, purpose):
    """A seed in [1, MAX_SEED) for `purpose`, fixed by (seed, purpose).

    Args:
        seed: The search's seed, an integer in [0, MAX_SEED].
        purpose: What the seed is for, e.g. `"oracle"`.

    Returns:
        An int: a hash of both, never 0 (keras-tuner's "unseeded").
    """
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % (MAX_SEED - 1)


def shifted(seed, k):
    """The k-th seed after `seed`, wrapped into [0, MAX_SEED]."""
    return (int(seed) + k) % (MAX_SEED + 1)
