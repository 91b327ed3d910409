"""PyTorch backend: AdamPlus's step as torch's fused multi-tensor Adam.

One `torch._fused_adam_` call (one pass over memory) updates every variable
of a (device, dtype, decays) group, where the generic path runs ~10
separate kernels per variable from a Python loop. The kernel computes in
float32 for half-precision weights and rounds the state once, as the
generic path does (`keras_adam_plus.rule`). Modes map onto the kernel as:

- `epsilon_mode="paper"`: the kernel itself (Algorithm 1, torch's order),
  its step count a device tensor (`iterations + 1`).
- `epsilon_mode="hat"` and `bias_correction=False`: an infinite step count
  (so the kernel's corrections are 1) and the learning rate
  `alpha = lr * sqrt(c2) / c1` from `rule.step_scalars` (or `lr`), a device
  tensor: `alpha * m / (sqrt(v) + epsilon)` is the rule's direction.
- `amsgrad=True`: the kernel's max of the raw second moment (ours too).
- weight decay `"l2"`: the kernel's Adam mode; `"decoupled"`: its AdamW
  mode, or, where the kernel's learning rate is alpha, `theta *= 1 - lr *
  wd` first; `"decoupled_unscaled"`: `theta -= wd * theta` first.
  Variables excluded from weight decay form their own group.

Only variables of the native state format are fused: where a group keeps
another format (`variable_groups` with a `state_format`), its variables
take the generic step, one at a time, in the same `update` (the kernel
reads and writes m, v as stored); with no native variable, the path falls
back whole.

Nothing is read back to the host: no step count, no learning rate.
Configurations and executions it does not handle (see `fallback_reason`)
run the generic path; `AdamPlus.fast_path` says which one runs.
"""

import torch

from keras_adam_plus import rule, storage


def _stateless():
    # Keras has no public test for "inside a StatelessScope".
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def fallback_reason(plan, variables, store):
    """None if this path handles `plan` now, else the reason."""
    hyper = plan.hyper
    if not hasattr(torch, "_fused_adam_"):
        return f"torch {torch.__version__} has no torch._fused_adam_"
    formats = _formats(plan, variables)
    if not any(f.native for f in formats):
        names = ", ".join(dict.fromkeys(repr(f.name) for f in formats))
        return (f"state format {names}: the fused kernel reads and "
                "writes m, v as they are stored")
    if hyper.adamax:
        return "adamax has no fused torch kernel"
    if hyper.nesterov:
        return "nesterov has no fused torch kernel"
    if plan.betas_scheduled:
        return "scheduled betas have no fused torch kernel"
    if plan.decay_scheduled:
        return "a scheduled weight decay has no fused torch kernel"
    reason = _layout_reason(plan, variables, store)
    if reason is not None:
        return reason
    if torch.compiler.is_compiling():
        # The fused kernel has no meta implementation for tensor lr;
        # inductor fuses the generic path itself.
        return "under torch.compile (jit_compile=True) the generic path " \
               "is compiled"
    return None


def _formats(plan, variables):
    """Each variable's state format (before build, each group's)."""
    if len(plan.setting_of) == len(variables) and variables:
        return [plan.format(i) for i in range(len(variables))]
    return plan.group_formats


def _fused(plan, variables):
    """`(position, variable)` of the variables of the native format."""
    return [(i, v) for i, v in enumerate(variables)
            if plan.format(i).native]


def _on_accelerator(variable):
    """Whether `variable` lives on a GPU (any device but the CPU)."""
    return variable.value.device.type != "cpu"


def _layout_reason(plan, variables, store):
    """Why the variables' dtypes or devices forbid the kernel, or None.

    Cached per variable list (a variable's dtype and device do not change):
    with 1000 variables these checks cost milliseconds of Python a step,
    about what a whole step takes on a GPU.
    """
    if store is None:
        return _check_layout(plan, variables)
    return storage.per_variables(
        store.cache, "torch_fused_layout", variables,
        lambda: _check_layout(plan, variables))


def _decay_outside_kernel(plan, setting):
    """Whether `update` applies a group's weight decay before the kernel."""
    if not setting.weight_decay:
        return False
    mode = setting.hyper.weight_decay_mode
    return mode == "decoupled_unscaled" or (mode == "decoupled"
                                            and _hat(plan))


def _hat(plan):
    """Whether the kernel runs with corrections 1 and the rule's alpha."""
    return plan.hyper.epsilon_mode == "hat" or not plan.hyper.bias_correction


def _check_layout(plan, variables):
    fused = _fused(plan, variables)
    variables = [v for _, v in fused]
    if any(plan.format(i).slot_dtype(v, plan.moment_dtype)
           != storage.dtype_of(v) for i, v in fused):
        return ("moment_dtype: the fused kernel keeps state in the "
                "parameters' dtype")
    if any(storage.dtype_of(v) in storage.LOW_PRECISION and plan.decays[i]
           and _decay_outside_kernel(plan, plan.setting(i))
           for i, v in fused):
        # Found by the conformance matrix (decoupled_unscaled, float16,
        # fit): theta rounded after the decay and again after the kernel
        # ended 2-3 float16 spacings off the reference, which rounds once.
        return ("decoupled weight decay with float16/bfloat16 weights: "
                "applied before the kernel, theta would be rounded twice "
                "a step")
    if any(str(v.dtype) == "float64" and _on_accelerator(v)
           for v in variables):
        # CUDA's kernel reads a float32 learning-rate tensor; float64
        # weights keep a float64 learning rate on the generic path.
        return ("float64 weights on an accelerator: the fused kernel's "
                "learning rate is float32 there")
    if not plan.hyper.bias_correction and any(
            _on_accelerator(v) for v in variables):
        # Measured on an H200 (torch 2.11, CUDA 13): the CUDA kernel forms
        # 1 - beta_2 from beta_2 rounded to float32 (1.3e-5 relative for
        # 0.999; the CPU kernel keeps it in float64). Bias correction
        # divides by 1 - beta_2**t built from the same rounded beta_2, so
        # the error cancels; without it, it does not: 6 steps ended 1e-5
        # off the float64 reference (a NumPy Adam with float32 betas
        # reproduces that), the generic path 3e-7.
        return ("bias_correction=False on an accelerator: torch's CUDA "
                "kernel rounds beta_2 to float32 (1.3e-5 relative in "
                "1 - beta_2 for 0.999), which only bias correction "
                "cancels")
    return None


def _groups(step, variables, stateless):
    """Variables grouped by (device, dtype, decays, `variable_groups` group)

    Each group holds the positions of its variables in `variables`, and
    the tensors of the parameters and of their m, v (and v_max) slots;
    returned with the positions of the variables of another state format
    (generic). The groups are cached per variable list (Keras's torch
    variables keep their tensor across `assign`), except in a
    StatelessScope, where the tensors are copies of the scope's values,
    written back with `assign`.
    """
    if stateless:
        return _build_groups(step, variables, stateless)
    return storage.per_variables(
        step.store.cache, "torch_fused_groups", variables,
        lambda: _build_groups(step, variables, stateless))


def _build_groups(step, variables, stateless):
    def tensor(variable):
        value = variable.value
        return value.clone() if stateless else value

    groups, rest = {}, []
    for position, variable in enumerate(variables):
        index = step.index(variable)
        if not step.store.formats[index].native:
            rest.append(position)
            continue
        slots = [variable] + [s for s in step.store.slots(index)
                              if s is not None]
        param = tensor(variable)
        group = groups.setdefault(
            (param.device, param.dtype, step.plan.decays[index],
             step.plan.group(index)),
            ([], [], [], [], [], []),
        )
        group[0].append(position)
        for column, slot in zip(group[1:5], slots):
            column.append(tensor(slot) if slot is not variable else param)
        group[5].append(slots)
    return groups, rest


@torch.no_grad()
def update(step, grads, variables):
    """Applies one AdamPlus step to `variables` with fused torch kernels."""
    stateless = _stateless()
    groups, rest = _groups(step, variables, stateless)
    for p in rest:  # another state format: the generic step
        index = step.index(variables[p])
        step.run([grads[p]], [variables[p]], step.store.slots(index), index)
    plan = step.plan
    hat = _hat(plan)
    scalars = {}
    for (_, dtype, decays, k), group in groups.items():
        positions, params, ms, vs, v_maxes, slots = group
        setting = plan.setting(step.index(slots[0][0]))
        hyper = setting.hyper
        wd_mode = hyper.weight_decay_mode
        grad_list = [grads[i] for i in positions]
        # The kernel reads each gradient in memory order: a transposed,
        # sliced or broadcast (stride-0) view is copied first (the shapes
        # are the parameters' already: `gradients.conform`).
        grad_list = [g if g.dtype == dtype and g.is_contiguous()
                     else g.to(dtype).contiguous() for g in grad_list]
        compute = rule.compute_dtype(str(dtype).replace("torch.", ""))
        if (compute, k) not in scalars:
            scalars[compute, k] = _kernel_scalars(step, compute, hat, k,
                                                  setting.lr_multiplier)
        lr, count, alpha = scalars[compute, k]
        decay = setting.weight_decay if decays else 0.0
        if decay and wd_mode == "decoupled_unscaled":
            torch._foreach_add_(params, params, alpha=-decay)
            decay = 0.0
        elif decay and wd_mode == "decoupled" and hat:
            torch._foreach_mul_(params, 1.0 - lr * decay)
            decay = 0.0
        kernel = (torch._fused_adamw_
                  if decay and wd_mode == "decoupled" else torch._fused_adam_)
        kernel(
            params, grad_list, ms, vs, v_maxes, [count] * len(params),
            lr=alpha, beta1=hyper.beta_1, beta2=hyper.beta_2,
            weight_decay=decay, eps=hyper.epsilon,
            amsgrad=hyper.amsgrad, maximize=False,
        )
        if stateless:
            columns = (params, ms, vs, v_maxes)
            for i, variable_slots in enumerate(slots):
                for column, slot in zip(columns, variable_slots):
                    slot.assign(column[i])


def _kernel_scalars(step, dtype, hat, group, multiplier):
    """(lr, step, kernel lr) as device tensors of this step, no host sync.

    "paper": the kernel's step is t and its learning rate lr. "hat" or no
    bias correction: its step is infinite (corrections 1) and its learning
    rate the rule's alpha.
    """
    count = step.iterations
    count = getattr(count, "value", count)
    if hat:
        s = step.scalars(dtype, group)
        inf = torch.full((), float("inf"), dtype=torch.float32,
                         device=s.lr.device)
        return s.lr, inf, s.alpha
    lr = rule.as_dtype(step.learning_rate, dtype)
    if multiplier != 1.0:
        lr = lr * rule.constant(multiplier, dtype)
    return lr, (count + 1).to(torch.float32), lr
