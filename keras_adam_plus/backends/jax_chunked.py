"""JAX backend: a large low-bit variable's step as `chunked`'s loop.

`keras_adam_plus.backends.chunked` has the loop and why. On JAX it takes
the steps of variables of at least `chunked.MIN_SIZE` elements, inside a
trace (`fit`, `stateless_apply`: inlined in Keras's jitted step, whose
buffers `fit` donates, so theta is updated in place) and eagerly (one
`jax.jit`ted program per shape and configuration, which copies theta
once), on a CPU; it stands aside, for the generic step, where
`plan.generic_only` says so and on other devices.

Run eagerly, the generic step is op by op where this one is fused, and
scales may differ by an ulp or two, so, rarely, a code by one.
"""

import jax

from keras_adam_plus.backends import chunked

# Variables below this many elements take the generic step.
MIN_SIZE = chunked.MIN_SIZE
# Jitted programs kept, by configuration (`_program`), the oldest dropped.
MAX_PROGRAMS = 32
_PROGRAMS = {}


def handles(step, variables, index):
    """Whether this path takes the step of `variables` of position
    `index`: on a CPU (it is measured there only; on a GPU a loop's
    iterations would be small kernels in turn)."""
    return (chunked.handles(step, variables, index, MIN_SIZE)
            and jax.default_backend() == "cpu")


def describe(variables, store):
    """What `AdamPlus.fast_path` adds (`chunked.describe`)."""
    return chunked.describe(variables, store, MIN_SIZE, "(jax_chunked)")


def run(step, grads, variables, slots, index):
    """The rule on one low-bit variable, chunk by chunk; True (taken)."""
    return chunked.run(step, grads, variables, slots, index, _program)


def _program(hyper, decays, fmt, dtype, kinds):
    """The jitted step of one configuration (each shape compiles once;
    inlined where it is traced), shared by the optimizers of equal
    configurations (a format's step depends on its bits only)."""
    try:
        hash(hyper)
        same = hyper  # equal configurations share a program
    except TypeError:  # a schedule with `__eq__` and no `__hash__`
        same = id(hyper)
    key = (same, decays, fmt.bits, dtype, kinds)
    found = _PROGRAMS.get(key)
    if found is None or (same is not hyper and found[0] is not hyper):
        if len(_PROGRAMS) >= MAX_PROGRAMS:  # the oldest goes (a sweep
            # builds optimizers whose schedules are new objects each time)
            del _PROGRAMS[next(iter(_PROGRAMS))]
        found = _PROGRAMS[key] = (hyper, jax.jit(
            chunked.traced(hyper, decays, fmt, dtype, kinds)))
    return found[1]
