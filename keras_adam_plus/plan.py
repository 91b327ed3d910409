"""What an AdamPlus step does, decided once: a frozen record of its modes.

`AdamPlus` makes a `Plan` at build (and a preview before it, for
`fast_path`); the step's paths (`keras_adam_plus.backends`), the store
(`keras_adam_plus.storage`) and the skip of non-finite steps receive it as
an argument and never read the optimizer. `Step` is one step's view: the
plan, the store and the step's scalars, computed once per compute dtype.
"""

import dataclasses

from keras import ops

from keras_adam_plus import averaging, backends, groups, rule, storage


@dataclasses.dataclass(frozen=True)
class Plan:
    """The modes of an AdamPlus step, fixed at build.

    Attributes:
        hyper: The rule's arguments (`rule.Hyper`); betas may be schedules.
        weight_decay: A float, a schedule (callable of the step) or None.
        decays: Per variable (build order): whether weight decay applies.
        groups: Positions of variables that share flat slots (JAX's
            `group_small_variables`), or ().
        state_format: How m, v (v_max) are stored (`storage.Format`):
            the default group's; a group's own is its setting's
            (`format`).
        moment_dtype: None or "float32" (half-precision weights' state).
        lazy_sparse: TensorFlow's sparse rows path on.
        skip_nonfinite: Steps with a NaN or an Inf gradient are skipped.
        average_decay: The temporal average's decay, or None.
        generic_only: Why no fast path may run (a subclass overrides
            `update_step`, or a test forces the generic path), or None.
        settings: The groups' `groups.Setting`s (`variable_groups`);
            settings[0] is the default group (`hyper`, `weight_decay`).
        setting_of: Per variable (build order): its group in `settings`.
    """

    hyper: rule.Hyper
    weight_decay: object = None
    decays: tuple = ()
    groups: tuple = ()
    state_format: object = None
    moment_dtype: str = None
    lazy_sparse: bool = False
    skip_nonfinite: bool = False
    average_decay: float = None
    generic_only: str = None
    settings: tuple = ()
    setting_of: tuple = ()

    def setting(self, index):
        """The `groups.Setting` of variable `index`."""
        if not self.setting_of:
            return groups.Setting(self.hyper, 1.0, self.weight_decay,
                                  "default")
        return self.settings[self.setting_of[index]]

    def group(self, index):
        """The position of variable `index`'s group in `settings`."""
        return self.setting_of[index] if self.setting_of else 0

    def format(self, index):
        """The `storage.Format` of variable `index`'s state (its group's)."""
        return self.setting(index).state_format or self.state_format or \
            storage.NATIVE

    @property
    def group_formats(self):
        """Each group's `storage.Format`, the default group's first."""
        return tuple(s.state_format or self.state_format or storage.NATIVE
                     for s in self.settings) or (
            self.state_format or storage.NATIVE,)

    @property
    def betas_scheduled(self):
        """Whether beta_1 or beta_2 is a schedule."""
        return not all(isinstance(b, float)
                       for b in (self.hyper.beta_1, self.hyper.beta_2))

    @property
    def decay_scheduled(self):
        """Whether the weight decay is a schedule."""
        return callable(self.weight_decay)


class Step:
    """One step's view of the optimizer: what its paths are given.

    Args:
        plan: The `Plan`.
        store: The `storage.Store` (None before build).
        iterations: The step count before this step (a scalar tensor).
        learning_rate: alpha of this step.
        index: `variable -> int`, the variable's position in the plan.
    """

    def __init__(self, plan, store, iterations, learning_rate, index):
        self.plan, self.store = plan, store
        self.iterations, self.learning_rate = iterations, learning_rate
        self.index = index
        self._scalars = {}

    def scalars(self, dtype, group=0):
        """This step's `rule.Scalars` in `dtype` for a group (its position
        in `plan.settings`), computed once."""
        key = (dtype, group)
        if key not in self._scalars:
            self._scalars[key] = _scalars(self, dtype, group)
        return self._scalars[key]

    def finish(self, variables):
        """After the update of `variables`: once per real step, the
        temporal averages and the beta products (after every variable
        used the old ones)."""
        store, hyper = self.store, self.plan.hyper
        if store.averages is not None:
            averaging.update(store, variables, self.index)
        for beta, power in zip((hyper.beta_1, hyper.beta_2),
                               store.beta_powers or ()):
            now = beta_now(beta, self.iterations)
            store.assign(power, power * rule.as_dtype(now, power.dtype))

    def run(self, grads, variables, slots, index):
        """The rule on `variables` (one, or a group with flat `slots`), of
        one group and weight decay: those of variable `index`."""
        compiled = backends.compiled_step(self, variables, index)
        if compiled is not None and compiled.run(self, grads, variables,
                                                 slots, index):
            return
        dtype = rule.compute_dtype(storage.dtype_of(variables[0]))
        state = storage.SlotState(self.store, variables, slots, dtype,
                                  self.store.formats[index])
        group = self.plan.group(index)
        rule.step(self.plan.setting(index).hyper, self.scalars(dtype, group),
                  storage.flat([ops.cast(g, dtype) for g in grads]), state,
                  self.plan.decays[index])
        state.finish()


def beta_now(beta, iterations, ahead=0):
    """A beta's value at this step: the constant, or its schedule's."""
    return beta if isinstance(beta, float) else beta(iterations + ahead)


def _scalars(step, dtype, group):
    plan = step.plan
    setting = plan.settings[group] if plan.settings else plan.setting(0)
    hyper = setting.hyper
    betas = beta_1_next = powers = None
    if plan.betas_scheduled:
        betas = [beta_now(b, step.iterations)
                 for b in (hyper.beta_1, hyper.beta_2)]
        powers = step.store.beta_powers
        if hyper.nesterov:
            beta_1_next = beta_now(hyper.beta_1, step.iterations, ahead=1)
    wd = setting.weight_decay
    if callable(wd):
        wd = wd(step.iterations)  # a tensor: never test its truth
    elif not wd:
        wd = None
    lr = step.learning_rate
    if setting.lr_multiplier != 1.0:
        lr = rule.as_dtype(lr, dtype) * rule.constant(setting.lr_multiplier,
                                                      dtype)
    return rule.step_scalars(
        hyper, dtype, step.iterations, lr, betas=betas,
        beta_1_next=beta_1_next, beta_powers=powers, weight_decay=wd)
