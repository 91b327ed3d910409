"""PyTorch backend: a low-bit variable's step as one compiled function.

Run eagerly, a step of block-wise state (`keras_adam_plus.lowbit`) is
about thirty `keras.ops` calls per variable (decode m and v, the rule,
each block's absmax, encode), each a pass over memory and Python time.
Here the same code, `rule.step` over the format's `decode_scaled` and
`encode_scaled`, runs on the variable's tensors inside one
`torch.compile`d function (`fullgraph=True`, one program per shape and
configuration, as torchao compiles its low-bit Adam per parameter), which
inductor fuses into a few loops.

It takes the steps of variables of at least `MIN_SIZE` elements, run
eagerly: where Keras compiles the whole step (`jit_compile=True`) the
generic step is compiled with it, and small variables are not worth a
compilation each (a few seconds a shape). It stands aside, for the
generic step, where `plan.generic_only` says so, inside a stateless scope
(`stateless_apply` records assignments), while a step is guarded
(`Store.finite`), and once a compilation failed (a warning says why).

Codes and scales are the generic step's (but for a block whose scale is
NaN: which of its end codes a NaN takes follows the NaN's sign, which
inductor and eager torch set differently); theta may differ from it in the
last bit: torch's eager CPU `sqrt` is not correctly rounded (one float32
element in several is one ulp off), inductor's is
(`tests/test_low_bit.py::test_a_compiled_step_is_the_eager_one`).
"""

import contextlib
import warnings

import torch

from keras_adam_plus import rule, storage

# Variables below this many elements take the generic step.
MIN_SIZE = 32768
# Set after a compilation failed: the reason, and no more attempts.
_FAILED = []


def handles(step, variables, index):
    """Whether this path takes the step of `variables` (one: a group's
    flat slots are never low-bit) of position `index`."""
    if len(variables) != 1 or _FAILED or step.plan.generic_only:
        return False
    store = step.store
    if store.finite is not None or not storage.large_blockwise(
            store, index, variables[0], MIN_SIZE):
        return False
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return not (in_stateless_scope() or torch.compiler.is_compiling())


def describe(variables, store):
    """What `AdamPlus.fast_path` adds where a group keeps low-bit state:
    how many variables this path takes (built; None for none), or which
    it would (before build), or that it failed."""
    if _FAILED:
        return (f"the compiled low-bit step failed ({_FAILED[0]}): every "
                "variable takes the eager step")
    if store is None:
        return (f"low-bit variables of {MIN_SIZE} elements or more: one "
                "compiled function each when run eagerly (torch_compiled)")
    count = sum(1 for i, v in enumerate(variables) if storage.large_blockwise(
        store, i, v, MIN_SIZE))
    if not count:
        return None
    return (f"{count} low-bit variable{'s' if count > 1 else ''} of "
            f"{MIN_SIZE} elements or more: one compiled function each "
            "when run eagerly (torch_compiled)")


@torch.no_grad()
def run(step, grads, variables, slots, index):
    """The rule on one low-bit variable, compiled; False where it could
    not compile (the generic step then runs)."""
    variable, store = variables[0], step.store
    dtype = rule.compute_dtype(storage.dtype_of(variable))
    fmt = store.formats[index]
    tensors = tuple(None if slot is None else (
        slot.value, store.scale_of(slot)[0].value) for slot in slots)
    scalars = step.scalars(dtype, step.plan.group(index))
    hyper = step.plan.setting(index).hyper
    try:
        with _no_recompile_limit():
            _compiled(variable.value, grads[0], tensors, scalars, hyper,
                      step.plan.decays[index], fmt, dtype)
    except Exception as error:  # inductor needs a C++ compiler, etc.
        _FAILED.append(f"{type(error).__name__}: {error}".splitlines()[0])
        warnings.warn("AdamPlus: the compiled low-bit step failed "
                      f"({_FAILED[0]}); low-bit variables take the "
                      "generic step", stacklevel=2)
        return False
    return True


def _step(theta, gradient, tensors, scalars, hyper, decays, fmt, dtype):
    state = storage.TensorState(
        theta.to(getattr(torch, dtype)), dict(zip(("m", "v", "v_max"),
                                                  tensors)),
        fmt, dtype, theta.shape)
    rule.step(hyper, scalars, gradient.to(getattr(torch, dtype)), state,
              decays)
    theta.copy_(state.value.to(theta.dtype))
    for kind, (new_codes, new_scales) in state.written.items():
        codes, scales = state.slots[kind]
        codes.copy_(new_codes)
        scales.copy_(new_scales)


_compiled = torch.compile(_step, fullgraph=True, dynamic=False)


def _no_recompile_limit():
    """Compile every shape and configuration (torchao does the same):
    their number is fixed by the model, and past dynamo's limit a
    function would run eagerly, silently."""
    utils = getattr(torch._dynamo, "utils", None)
    limit = getattr(utils, "disable_cache_limit", None)
    return limit() if limit is not None else contextlib.nullcontext()
