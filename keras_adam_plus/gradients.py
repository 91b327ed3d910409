"""Gradients checked once, the same way for every path of the step.

Keras's own `update_step` math broadcasts: a gradient of shape (1, 4) for
a (3, 4) variable updates every row, and one of shape (4, 3) fails inside
an op with a message about operands. The fast paths see gradients
differently (flattened into a group's flat slots on JAX, read in memory
order by torch's fused kernel), so before any path runs, `conform` gives
each dense gradient its variable's shape, or refuses it naming the
variable. Sparse gradients (`tf.IndexedSlices`) pass as they are.
"""

import numpy as np
from keras import ops

# The backend's tensor classes seen so far (eager and traced).
_TENSOR_TYPES = set()


def conform(grads, variables):
    """`grads`, each a backend tensor of its variable's shape.

    A NumPy array (or anything `convert_to_tensor` takes) becomes a tensor;
    a gradient whose shape broadcasts to its variable's is broadcast; any
    other shape raises ValueError naming the variable and both shapes.
    Dimensions unknown at trace time are left to the ops.
    """
    for grad, variable in zip(grads, variables):
        # The common case in one cheap pass (a Python loop over every
        # variable is part of each eager step): tensors of the right shape.
        if (grad.__class__ not in _TENSOR_TYPES
                or grad.shape != variable.shape):
            break
    else:
        return grads
    result = None
    for i, (grad, variable) in enumerate(zip(grads, variables)):
        fixed = _conform(grad, variable)
        if fixed is not grad:
            result = result or list(grads)
            result[i] = fixed
    return grads if result is None else result


def _conform(grad, variable):
    if type(grad).__name__ == "IndexedSlices":
        return grad
    if not ops.is_tensor(grad):
        grad = ops.convert_to_tensor(grad)
    _TENSOR_TYPES.add(grad.__class__)
    shape, wanted = tuple(grad.shape), tuple(variable.shape)
    if shape == wanted or None in shape or None in wanted:
        return grad
    try:
        broadcast = tuple(np.broadcast_shapes(shape, wanted))
    except ValueError:
        broadcast = None
    if broadcast != wanted:
        name = getattr(variable, "path", None) or variable.name
        raise ValueError(
            f"The gradient of variable {name!r} has shape {shape}, which "
            f"does not broadcast to the variable's shape {wanted}."
        )
    return ops.broadcast_to(grad, wanted)
