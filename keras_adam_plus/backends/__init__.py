"""Backend-specific fast paths of AdamPlus's update, one module each.

Each module sits beside the generic step (`plan.Step.run` per variable)
and is tested for equality with it. A fast path receives the plan, the
store and the step (`keras_adam_plus.plan`), never the optimizer, and
exposes `fallback_reason(plan, variables, store)` (None when it handles the
plan and the current execution, else why not; each module owns its list)
and `update(step, grads, variables)`.
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


def _compiled_module():
    """The module of the current backend that runs a large low-bit
    variable's step as one compiled program (torch: `torch_compiled`;
    JAX: `jax_chunked`; TensorFlow: `tf_chunked`), or None."""
    if keras.backend.backend() == "torch":
        from keras_adam_plus.backends import torch_compiled

        return torch_compiled
    if keras.backend.backend() == "jax":
        from keras_adam_plus.backends import jax_chunked

        return jax_chunked
    if keras.backend.backend() == "tensorflow":
        from keras_adam_plus.backends import tf_chunked

        return tf_chunked
    return None


def compiled_step(step, variables, index):
    """The module that runs the generic step of `variables` (position
    `index`) as one compiled program (`_compiled_module`), or None."""
    module = _compiled_module()
    return module if module is not None and module.handles(
        step, variables, index) else None


def slot_groups(var_list, keys, enabled):
    """Positions of `var_list` that share flat slots (JAX), at build:
    variables of equal `keys` (their decay and settings) may."""
    module = _module()
    if not enabled or module is None or not hasattr(module, "groups"):
        return ()
    return module.groups(var_list, keys, module.MAX_SIZE)


def _reason(module, plan, variables, store):
    return plan.generic_only or module.fallback_reason(plan, variables, store)


def fast_path(plan, variables, store):
    """The fast-path module that takes this step, or None (generic)."""
    module = _module()
    if module is not None and _reason(module, plan, variables, store) is None:
        return module
    return None


def describe(plan, variables, store):
    """`AdamPlus.fast_path`: the path's name, with the fallback reason
    (a state format other than the native one is always named, with its
    groups where groups keep different formats; with the compiled step
    of large low-bit variables where the backend has one)."""
    text = _with_formats(plan, variables, store)
    module = _compiled_module()
    if module is not None and not plan.generic_only and (
            any(f.scaled for f in plan.group_formats)):
        compiled = module.describe(variables, store)
        text = text if compiled is None else f"{text}; {compiled}"
    return text


def _with_formats(plan, variables, store):
    text = _describe(plan, variables, store)
    formats = plan.group_formats
    if all(f.native for f in formats) or "state format" in text:
        return text
    if not any(f.native for f in formats):
        names = ", ".join(dict.fromkeys(repr(f.name) for f in formats))
        return f"{text} (state format {names})"
    named = "; ".join(f"{f.name!r} in {s.name}" for s, f in zip(
        plan.settings, formats) if not f.native)
    return f"{text} (state format {named}, the other groups native" + (
        ", fused)" if text.startswith("torch_fused") else ")")


def _describe(plan, variables, store):
    module = _module()
    if module is None:
        return "generic"
    if hasattr(module, "describe") and not plan.generic_only:
        return module.describe(plan)
    reason = _reason(module, plan, variables, store)
    if reason is None:
        return module.__name__.rsplit(".", 1)[-1]
    return f"generic ({reason})"
