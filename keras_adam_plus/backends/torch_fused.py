"""PyTorch backend: AdamPlus's step as torch's fused multi-tensor Adam.

One `torch._fused_adam_` call (one pass over memory) updates every variable
of a (device, dtype) group, where the generic path runs ~10 separate
kernels per variable from a Python loop. Modes map onto torch's kernel as:

- `epsilon_mode="paper"`: the kernel itself (Algorithm 1, torch's order).
- `epsilon_mode="hat"`: `epsilon / sqrt(1 - beta_2**t)` passed as the
  kernel's epsilon (the same update, rearranged; round-off may differ).
- `bias_correction=False`: an infinite step count, so `beta**t = 0`.
- `amsgrad=True`: the kernel's max of the raw second moment (ours too).
- weight decay `"l2"` and `"decoupled"`: the kernel's Adam and AdamW modes;
  `"decoupled_unscaled"`: `theta -= wd * theta` by `torch._foreach_add_`
  first. Variables excluded from weight decay form their own group.

Configurations it does not handle (see `fallback_reason`) run the generic
path; `AdamPlus.fast_path` names which one an optimizer uses.
"""

import math

import torch


def fallback_reason(optimizer):
    """None if this path handles `optimizer`, else the reason it cannot."""
    if not hasattr(torch, "_fused_adam_"):
        return f"torch {torch.__version__} has no torch._fused_adam_"
    return optimizer._fast_path_blocker()


def _groups(optimizer, variables):
    """Variables grouped by (device, dtype, decays), cached per var list.

    Each group holds the positions of its variables in `variables` and the
    torch tensors of the parameters and of their m, v (and v_max) slots;
    the cache saves re-gathering them on every step (Keras's torch
    variables keep their tensor across `assign`).
    """
    key = tuple(id(v) for v in variables)
    cached = optimizer.__dict__.get("_torch_fused_groups")
    if cached is not None and cached[0] == key:
        return cached[1]
    groups = {}
    for position, variable in enumerate(variables):
        index = optimizer._get_variable_index(variable)
        param = variable.value
        group = groups.setdefault(
            (param.device, param.dtype, optimizer._decays[index]),
            ([], [], [], [], []),
        )
        group[0].append(position)
        group[1].append(param)
        group[2].append(optimizer._momentums[index].value)
        group[3].append(optimizer._velocities[index].value)
        if optimizer.amsgrad:
            group[4].append(optimizer._velocity_maxes[index].value)
    optimizer.__dict__["_torch_fused_groups"] = (key, groups)
    return groups


@torch.no_grad()
def update(optimizer, grads, variables, learning_rate):
    """Applies one AdamPlus step to `variables` with fused torch kernels."""
    groups = _groups(optimizer, variables)
    iterations = optimizer.iterations
    step = float(getattr(iterations, "value", iterations)) + 1.0
    epsilon = optimizer.epsilon
    if not optimizer.bias_correction:
        step = math.inf
    elif optimizer.epsilon_mode == "hat":
        epsilon = epsilon / math.sqrt(1.0 - optimizer.beta_2**step)
    wd_mode = optimizer.weight_decay_mode
    lr = learning_rate.value if hasattr(learning_rate, "value") else (
        learning_rate
    )
    for (device, dtype, decays), group in groups.items():
        positions, params, ms, vs, v_maxes = group
        grad_list = [grads[i] for i in positions]
        grad_list = [g if g.dtype == dtype else g.to(dtype)
                     for g in grad_list]
        lr_t = torch.as_tensor(lr, device=device).detach().to(torch.float32)
        decay = optimizer.weight_decay if decays else 0.0
        if decay and wd_mode == "decoupled_unscaled":
            torch._foreach_add_(params, params, alpha=-decay)
            decay = 0.0
        kernel = (torch._fused_adamw_
                  if decay and wd_mode == "decoupled" else torch._fused_adam_)
        steps = [torch.full((), step, dtype=torch.float32, device=device)]
        kernel(
            params, grad_list, ms, vs, v_maxes, steps * len(params),
            lr=lr_t, beta1=optimizer.beta_1, beta2=optimizer.beta_2,
            weight_decay=decay, eps=epsilon, amsgrad=optimizer.amsgrad,
            maximize=False,
        )
