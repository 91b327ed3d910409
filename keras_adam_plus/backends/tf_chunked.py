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
where `plan.generic_only` says so.
"""

from keras_adam_plus.backends import chunked

# Variables below this many elements take the generic step.
MIN_SIZE = 2 ** 20


def handles(step, variables, index):
    """Whether this path takes the step of `variables` of position
    `index`: large enough, inside an XLA-compiled function."""
    return (chunked.handles(step, variables, index, MIN_SIZE)
            and in_xla())


def in_xla():
    """Whether the step is being traced for XLA (`jit_compile=True`); False
    where TensorFlow's internal module to tell is missing."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()))


def describe(variables, store):
    """What `AdamPlus.fast_path` adds (`chunked.describe`)."""
    return chunked.describe(variables, store, MIN_SIZE,
                            "under XLA (tf_chunked)")


def run(step, grads, variables, slots, index):
    """The rule on one low-bit variable, chunk by chunk; True (taken)."""
    return chunked.run(step, grads, variables, slots, index, chunked.traced)
