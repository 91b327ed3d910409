"""PyTorch backend: a low-bit variable's step as one compiled function.

Run eagerly, a step of block-wise state (`keras_adam_plus.lowbit`) is
about thirty `keras.ops` calls per variable (decode m and v, the rule,
each block's absmax, encode), each a pass over memory and Python time.
Here the same code, `rule.step` over the format's `decode_scaled` and
`encode_scaled`, runs inside one `torch.compile`d function
(`fullgraph=True`, one program per shape and configuration, as torchao
compiles its low-bit Adam per parameter), which inductor fuses into a few
loops, called on the variable's flattened tensors in chunks of at most
`CHUNK` elements on a CPU, once on other devices (views: theta, codes and
scales are written in place).

It takes the steps of variables of at least `MIN_SIZE` elements, run
eagerly: where Keras compiles the whole step (`jit_compile=True`) the
generic step is compiled with it, and small variables are not worth a
compilation each (a few seconds a shape). It stands aside, for the
generic step, where `plan.generic_only` says so, inside a stateless scope
(`stateless_apply` records assignments), while a step is guarded
(`Store.finite`), for a variable not contiguous in memory (no flat view),
and once a compilation failed (a warning says why).

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
from keras_adam_plus.backends import chunked

# Variables below this many elements take the generic step.
MIN_SIZE = 32768
# Elements a call, at most: a larger variable is stepped in chunks of this
# many (whole blocks of both bit widths, an even count), so that the
# moments inductor writes between each block's absmax and its encoding
# stay in cache rather than in buffers of the variable's size. One
# program serves every variable's whole chunks (docs/speed.md has the
# sizes measured).
CHUNK = 262144
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
    if not variables[0].value.is_contiguous():  # no flat view of it
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
    theta, gradient = variable.value.view(-1), grads[0].reshape(-1)
    flat = tuple(None if slot is None else (
        slot.value.view(-1), store.scale_of(slot)[0].value) for slot in slots)
    scalars = step.scalars(dtype, step.plan.group(index))
    hyper, decays = step.plan.setting(index).hyper, step.plan.decays[index]
    n, start = theta.shape[0], 0
    # On a GPU one call (measured on CPUs only; there each call's Python
    # and launches would repeat a chunk at a time).
    chunk = CHUNK if theta.device.type == "cpu" else n
    step_chunk = _compiled
    with _no_recompile_limit():
        while start < n:
            end = min(n, start + chunk)
            (byte, size), (first, count) = chunked.spans(
                start, end - start, fmt)  # `start` is whole blocks
            tensors = tuple(None if pair is None else (
                pair[0][byte:byte + size], pair[1][first:first + count])
                for pair in flat)
            try:
                step_chunk(theta[start:end], gradient[start:end], tensors,
                           scalars, hyper, decays, fmt, dtype)
            except Exception as error:  # inductor needs a C++ compiler, etc.
                if step_chunk is _step:
                    raise
                _FAILED.append(
                    f"{type(error).__name__}: {error}".splitlines()[0])
                warnings.warn("AdamPlus: the compiled low-bit step failed "
                              f"({_FAILED[0]}); low-bit variables take the "
                              "generic step", stacklevel=2)
                if not start:
                    return False  # nothing written: the generic step runs
                # Chunks before this one are written: the rest runs the
                # same function uncompiled (compilation fails before a
                # program writes anything).
                step_chunk = _step
                continue
            start = end
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
