"""AdamPlus: Adam (Kingma & Ba, 2015) for Keras 3, exact and validated.

Arguments, config and Keras's hooks. At build the optimizer decides its
`plan.Plan` and makes its `storage.Store`; each step hands them to a path.
"""

import keras

from keras_adam_plus import (
    averaging,
    backends,
    gradients,
    groups,
    lowbit,
    nonfinite,
    plan,
    rule,
    schedules,
    storage,
    validation,
)


@keras.saving.register_keras_serializable(package="keras_adam_plus")
class AdamPlus(keras.optimizers.Optimizer):
    """Adam, as in Algorithm 1 of Kingma & Ba (2015), with validated options.

    For each variable `theta` with gradient `g`, at step `t = 1, 2, ...`:

    ```
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g**2
    v_max = max(v_max, v)                        # amsgrad=True: use v_max
    m_hat = m / (1 - beta_1**t)                  # bias_correction=True
    v_hat = v / (1 - beta_2**t)
    # epsilon_mode="paper" (Algorithm 1; torch.optim.Adam, optax.adam):
    theta = theta - alpha * m_hat / (sqrt(v_hat) + epsilon)
    # epsilon_mode="hat" (end of Section 2; keras.optimizers.Adam, TF):
    alpha_t = alpha * sqrt(1 - beta_2**t) / (1 - beta_1**t)
    theta = theta - alpha_t * m / (sqrt(v) + epsilon)
    ```

    The two epsilon conventions agree only when the "hat" epsilon equals
    `epsilon * sqrt(1 - beta_2**t)`. `epsilon_mode="hat", epsilon=1e-7`
    reproduces `keras.optimizers.Adam` exactly; the default (`"paper"`,
    `1e-8`) follows the paper, PyTorch and optax. Weight decay (`lambda`)
    is applied before the step: `"decoupled"` `theta -= alpha * lambda *
    theta` (Keras AdamW), `"decoupled_unscaled"` `theta -= lambda * theta`
    (Loshchilov & Hutter), `"l2"` `g += lambda * theta` (torch Adam).

    Args:
        learning_rate: alpha: a float >= 0, a `LearningRateSchedule` or a
            callable of no arguments. Defaults to `0.001`.
        beta_1: First-moment decay in [0, 1), or a schedule of the step
            (`BetaDecay`). Defaults to `0.9`.
        beta_2: Second-moment decay, as `beta_1`. Defaults to `0.999`.
        epsilon: Added to the denominator, > 0. Defaults to `1e-8`.
        epsilon_mode: `"paper"` or `"hat"` (above). Defaults to `"paper"`.
        amsgrad: AMSGrad (Reddi et al., 2018): the running max of the raw
            `v`, bias-corrected after (torch's order). Defaults to `False`.
        bias_correction: Divide by `1 - beta**t`; `False` is RMSProp with
            momentum (Section 6.4). Defaults to `True`.
        adamax: AdaMax (Algorithm 2); not with amsgrad. Defaults to `False`.
        nesterov: Nesterov momentum in the step. Defaults to `False`.
        skip_nonfinite: Skip every step with a NaN or Inf gradient (nothing
            changes; `skipped_steps` counts). Defaults to `False`.
        average_decay: b in [0, 1): keep Section 7.2's temporal average
            (`average_weights()`). Defaults to `None`.
        lazy_sparse: TensorFlow: sparse gradients update only their rows
            (LazyAdam). Defaults to `False`.
        group_small_variables: JAX: variables of <= 8192 elements share flat
            slots (faster with many small ones; `get_state_tree()` sees
            them: `backends.jax_grouped`). Defaults to `False`.
        moment_dtype: `"float32"` keeps half-precision weights' state in
            float32. Defaults to `None`.
        state_format: How m, v (v_max, u) are stored: `"native"` (the
            weight's dtype, or `moment_dtype`), `"8bit"` (bitsandbytes'
            dynamic maps, a float32 absmax per 256: ~2.03 bytes/parameter)
            or `"4bit"` (torchao's Adam4bit: two codes a byte, absmax per
            128: ~1.06), decoded to float32 for the step, encoded once.
            Defaults to `"native"`.
        state_format_min_size: With a low-bit format, variables of fewer
            (and float64 ones, or those with a distribution layout) keep
            the native format, as bitsandbytes' `min_8bit_size`. Defaults
            to `4096`.
        weight_decay: lambda, >= 0, or a schedule. Defaults to `None`.
        weight_decay_mode: `"decoupled"`, `"decoupled_unscaled"`, `"l2"`.
            Defaults to `"decoupled"`.
        weight_decay_exclude: Regular expressions; a variable whose path or
            name matches one is not decayed. Defaults to `None`.
        variable_groups: Per-variable settings: rules `{"match": regex,
            "learning_rate_multiplier": 0.1, ...}`, first match on a
            variable's path wins (`groups`); a group may keep its own
            `state_format`. Defaults to `None`.
        clipnorm: Clip each gradient to this L2 norm. Defaults to `None`.
        clipvalue: Clip gradients to +-clipvalue. Defaults to `None`.
        global_clipnorm: Clip all gradients jointly. Defaults to `None`.
        use_ema: Keep Keras's average of the weights. Defaults to `False`.
        ema_momentum: Its momentum, in [0, 1]. Defaults to `0.99`.
        ema_overwrite_frequency: Overwrite the weights with it every this
            many steps. Defaults to `None`.
        loss_scale_factor: Static loss scale, > 0. Defaults to `None`.
        gradient_accumulation_steps: Average this many batches' gradients
            per update (`1`, `None`: none). Defaults to `None`.
        name: The optimizer's name. Defaults to `"adam_plus"`.

    Example:

    >>> import keras, numpy as np
    >>> from keras_adam_plus import AdamPlus
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=AdamPlus(learning_rate=1e-2), loss="mse")
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR
        2015, https://arxiv.org/abs/1412.6980. Reddi et al., "On the
        Convergence of Adam and Beyond", ICLR 2018 (AMSGrad). Dozat,
        "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR
        2019, https://arxiv.org/abs/1711.05101.
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
        ICLR 2022, https://arxiv.org/abs/2110.02861 (`state_format`).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, epsilon_mode="paper", amsgrad=False,
                 bias_correction=True, adamax=False, nesterov=False,
                 skip_nonfinite=False, average_decay=None, lazy_sparse=False,
                 group_small_variables=False, moment_dtype=None,
                 weight_decay=None, weight_decay_mode="decoupled",
                 weight_decay_exclude=None, variable_groups=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None,
                 use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name="adam_plus",
                 state_format="native", state_format_min_size=4096,
                 **kwargs):
        base, own = validation.arguments(**{k: v for k, v in locals().items()
                                            if k not in ("self", "kwargs",
                                                         "__class__")})
        super().__init__(**base, **kwargs)
        for key, value in own.items():
            setattr(self, key, value)
        # Of m, v (v_max), before build (tests may set another one).
        self._state_format = lowbit.format_of(self.state_format,
                                              self.state_format_min_size)
        self._pending_state = None  # a state loaded before build
        self._step = None  # this step's `plan.Step`, while it runs

    def build(self, var_list):
        """Makes the plan and the store; assigns a state loaded before."""
        if self.built:
            return
        storage.check_floating(var_list)
        super().build(var_list)
        self._plan = self._make_plan(var_list, built=True)
        self._store = storage.Store(
            self._plan, var_list, self.add_variable,
            (self.assign, self.assign_add, self.assign_sub), self.name,
            self.iterations.dtype)
        pending, self._pending_state = self._pending_state, None
        storage.assign_pending(self._face(), pending)

    def _make_plan(self, var_list, built=False):
        """The `plan.Plan` for `var_list` (a preview when not `built`)."""
        hyper = rule.Hyper(*(getattr(self, f) for f in rule.Hyper._fields))
        settings, setting_of = groups.assign(
            groups.Setting(hyper, 1.0, self.weight_decay, "default",
                           self._state_format), self.variable_groups,
            var_list, built, self.state_format_min_size)
        decays = tuple(bool(settings[k].weight_decay) and self._decays(v)
                       for v, k in zip(var_list, setting_of))
        generic = getattr(self, "_force_generic", None)  # tests compare
        if type(self).update_step is not AdamPlus.update_step:
            generic = f"{type(self).__name__} overrides update_step"
        flat = backends.slot_groups(var_list, list(zip(decays, setting_of)),
                                    built and not generic
                                    and self.group_small_variables)
        return plan.Plan(
            hyper, self.weight_decay, decays, flat, self._state_format,
            self.moment_dtype, self.lazy_sparse, self.skip_nonfinite,
            self.average_decay, generic, settings, setting_of)

    def describe(self):
        """Each group's settings and the variables it took (once built)."""
        return groups.describe(self._plan.settings, self._plan.setting_of,
                               self._trainable_variables)

    def _face(self):
        """The state as every saving route sees it (`storage.Face`)."""
        # Not `iterations`: a tensor of real steps under accumulation.
        scalars = {"iteration": self._iterations}
        if isinstance(self._learning_rate, keras.Variable):
            scalars["learning_rate"] = self._learning_rate
        own, store = list(self.variables), getattr(self, "_store", None)
        model = list(getattr(self, "_trainable_variables", []))
        return storage.Face(self.name, store.entries(own) if store else own,
                            own, model, scalars, self._pending_state,
                            self.built, store.formats if store else
                            self._make_plan(()).group_formats)

    def _new_step(self, learning_rate):
        return plan.Step(self._plan, self._store, self.iterations,
                         learning_rate, self._get_variable_index)

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` (see the class docstring)."""
        step = self._step or self._new_step(learning_rate)
        if self.lazy_sparse and keras.backend.backend() == "tensorflow":
            from keras_adam_plus.backends import tf_lazy

            if tf_lazy.handles(self._plan, gradient):
                return tf_lazy.update_step(step, gradient, variable)
        index = self._get_variable_index(variable)
        step.run([gradient], [variable], self._store.slots(index), index)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        grads = gradients.conform(grads, trainable_variables)
        self._step = step = self._new_step(learning_rate)
        try:
            fast = backends.fast_path(self._plan, self._trainable_variables,
                                      self._store)
            if fast is not None:
                fast.update(step, grads, trainable_variables)
            else:
                super()._backend_update_step(grads, trainable_variables,
                                             learning_rate)
        finally:
            self._step = None
        step.finish(trainable_variables)

    def apply(self, grads, trainable_variables=None):
        """`Optimizer.apply`; with `skip_nonfinite`, a step with a NaN or
        Inf gradient (any replica) changes nothing but `skipped_steps`."""
        store = getattr(self, "_store", None)
        if not self.skip_nonfinite or (store is not None and store.checked) \
                or (not self.built and trainable_variables is None):
            return super().apply(grads, trainable_variables)  # or its error
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        nonfinite.apply(self._skip(), lambda g: super(AdamPlus, self).apply(
            g, trainable_variables), list(grads))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """`Optimizer.stateless_apply`, with the skip of `apply`."""
        args = (optimizer_variables, grads, trainable_variables)
        store = getattr(self, "_store", None)  # unbuilt: Keras's error
        if not self.skip_nonfinite or store is None or store.checked:
            return super().stateless_apply(*args)
        return nonfinite.stateless_apply(self._skip(), lambda: super(
            AdamPlus, self).stateless_apply(*args), *args)

    def _skip(self):
        return nonfinite.Skip(self._store, self._trainable_variables,
                              self.variables, bool(self.use_ema and (
                                  self.ema_overwrite_frequency)))

    # Keras's checks of each step's variable list, run once per list (each
    # is a Python loop over the variables); both are fixed at build.

    def _check_variables_are_known(self, variables):
        storage.per_variables(
            self._store.cache, "known", variables,
            lambda: super(AdamPlus, self)._check_variables_are_known(
                variables) or True)

    def _overwrite_variables_directly_with_gradients(self, grads, vars):
        if not storage.per_variables(
                self._store.cache, "overwrite", vars, lambda: any(
                    self._overwrite_variable_with_gradient(v) for v in vars)):
            return grads, vars
        return super()._overwrite_variables_directly_with_gradients(
            grads, vars)

    def _decays(self, variable):
        """Whether `variable` is not excluded from weight decay."""
        return not validation.matches(self.weight_decay_exclude, variable) \
            and self._use_weight_decay(variable)  # Keras's exclusions too

    def _apply_weight_decay(self, variables):
        return  # every weight decay mode is applied in the step instead

    def _get_current_learning_rate(self):
        # Schedules see real steps, not gradient accumulation's micro-steps.
        schedule = keras.optimizers.schedules.LearningRateSchedule
        if isinstance(self._learning_rate, schedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    @property
    def fast_path(self):
        """The update this optimizer runs: `"torch_fused"`, `"jax_grouped
        (...)"` or `"generic"`, with the reason where it falls back."""
        built = self.built and hasattr(self, "_plan")
        variables = list(getattr(self, "_trainable_variables", []))
        return backends.describe(self._plan if built else self._make_plan(
            variables), variables, getattr(self, "_store", None))

    def average_weights(self, var_list=None):
        """theta_bar / (1 - b**t) (Section 7.2) per variable of `var_list`
        (default: those of build); before the first step, their values."""
        return averaging.corrected(
            getattr(self, "_store", None), self.average_decay,
            self.iterations, var_list if var_list is not None else getattr(
                self, "_trainable_variables", None), self._get_variable_index)

    def use_average_weights(self, var_list=None):
        """Context manager: the variables hold their averages inside it
        (`with opt.use_average_weights(): model.evaluate(...)`)."""
        return averaging.Swap(self.average_weights, getattr(
            self, "_trainable_variables", []) if var_list is None else var_list)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients (a saved variable), or
        `None` before build or without `skip_nonfinite`."""
        return getattr(getattr(self, "_store", None), "skipped", None)

    def get_config(self):
        """Returns the JSON-serializable config; every key is an argument."""
        return {**super().get_config(), **{key: schedules.serialize(getattr(
            self, key)) for key in validation.OWN + ("weight_decay",)}}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Builds an AdamPlus from `get_config()`, schedules included."""
        return super().from_config(schedules.deserialize_config(
            config, custom_objects), custom_objects=custom_objects)

    def save_own_variables(self, store):
        """Saves the state by index (as Keras does) and the kind of each."""
        storage.save(self._face(), store)

    def load_own_variables(self, store):
        """Loads a saved state, all or nothing (it raises), matched by kind
        and shape; before build it is kept and assigned at build."""
        self._pending_state = storage.load(
            self._face(), store, self._make_plan(()), self.use_ema,
            bool(self.gradient_accumulation_steps))

    def get_weights(self):
        """The state as NumPy arrays in the per-variable layout (the step
        count, then the slots in Keras's order), whatever the grouping."""
        return storage.get_weights(self._face())

    def set_weights(self, weights):
        """Assigns `get_weights()`'s arrays (or the legacy `.h5` layout of
        `variables`), all or none: shapes are checked before any write."""
        if not self.built:
            return super().set_weights(weights)  # Keras's error
        storage.set_weights(self._face(), weights)

    def __reduce__(self):
        # The config and the state, assigned when the copy is built.
        state = storage.snapshot(self._face()) if (
            self.built or self._pending_state is not None) else None
        return _unpickle, (self.__class__, self.get_config(), state)


def _unpickle(cls, config, state):
    optimizer = cls.from_config(config)
    optimizer._pending_state = storage.unpickled(optimizer._face(), state)
    return optimizer
