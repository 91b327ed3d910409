"""Backend-specific fast paths of AdamPlus's update, one module each.

Each module sits beside the generic `AdamPlus.update_step` and is tested for
equality with it. A fast path exposes `fallback_reason(optimizer)` (None when
it handles the optimizer's configuration, else why not) and
`update(optimizer, grads, variables, learning_rate)`.
"""
