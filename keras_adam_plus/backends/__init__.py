"""Backend-specific fast paths of AdamPlus's update, one module each.

Each module sits beside the generic `AdamPlus.update_step` and is tested for
equality with it. A fast path exposes `fallback_reason(optimizer)` (None when
it handles the optimizer's configuration and the current execution, else
why not; each module owns its list) and `update(optimizer, grads,
variables, learning_rate)`.
"""

import keras


def _module():
    """The fast-path module of the current backend, or None."""
    if keras.backend.backend() == "torch":
        from keras_adam_plus.backends import torch_fused

        return torch_fused
    if keras.backend.backend() == "jax":
        from keras_adam_plus.backends import jax_grouped

        return jax_grouped
    return None


def slot_groups(optimizer, var_list):
    """Positions of `var_list` that share flat slots (JAX), at build."""
    module = _module()
    if module is None or not hasattr(module, "plan"):
        return []
    return module.plan(optimizer, var_list)


def _reason(module, optimizer):
    # `optimizer._force_generic` (a reason string) forces the generic path,
    # for tests that compare the two.
    forced = getattr(optimizer, "_force_generic", None)
    return forced or module.fallback_reason(optimizer)


def fast_path(optimizer):
    """The fast-path module that takes this step, or None (generic)."""
    module = _module()
    if module is not None and _reason(module, optimizer) is None:
        return module
    return None


def describe(optimizer):
    """`AdamPlus.fast_path`: the path's name, with the fallback reason."""
    module = _module()
    if module is None:
        return "generic"
    forced = getattr(optimizer, "_force_generic", None)
    if hasattr(module, "describe") and not forced:
        return module.describe(optimizer)
    reason = _reason(module, optimizer)
    if reason is None:
        return module.__name__.rsplit(".", 1)[-1]
    return f"generic ({reason})"
