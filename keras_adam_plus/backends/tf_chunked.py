"""TensorFlow backend: a large low-bit variable's step as `chunked`'s loop,
where XLA compiles the step.

`keras_adam_plus.backends.chunked` has the loop and why. On TensorFlow it
takes the steps of variables of at least `MIN_SIZE` elements inside a
function XLA compiles (`fit` or `tf.function` with `jit_compile=True`):
there it is faster than the whole-variable step and needs no temporaries
of the variable's size. Elsewhere (eagerly, a `tf.function` without XLA)
a loop is one small kernel per operation per chunk, so the generic step
runs; and for smaller variables, since each loop adds to XLA's
compilation (time and memory, which grow with the variables of a model
on TensorFlow) more than it saves. It stands aside, for the generic step,
where `plan.generic_only` says so, and on a GPU or TPU (it is measured
on CPUs only; there a loop's iterations would be small kernels in turn).
"""

from keras_adam_plus import nonfinite
from keras_adam_plus.backends import chunked

# Variables below this many elements take the generic step.
MIN_SIZE = 2 ** 20


def handles(step, variables, index):
    """Whether this path takes the step of `variables` of position
    `index`: large enough, on a CPU, inside an XLA-compiled function."""
    return (chunked.handles(step, variables, index, MIN_SIZE)
            and "CPU" in (_device(variables[0]) or "CPU").upper()
            and nonfinite.in_xla())


def _device(variable):
    """The device string of a Keras or a TensorFlow variable ("" where it
    has none): Keras's steps get either."""
    for candidate in (variable, getattr(variable, "value", None)):
        device = getattr(candidate, "device", None)
        if isinstance(device, str):
            return device
    return ""


def describe(variables, store):
    """What `AdamPlus.fast_path` adds (`chunked.describe`)."""
    return chunked.describe(variables, store, MIN_SIZE,
                            "under XLA (tf_chunked)")


def run(step, grads, variables, slots, index):
    """The rule on one low-bit variable, chunk by chunk; True (taken)."""
    return chunked.run(step, grads, variables, slots, index, chunked.traced)
