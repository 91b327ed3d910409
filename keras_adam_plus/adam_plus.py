"""AdamPlus: Adam (Kingma & Ba, 2015) for Keras 3, exact and validated.

This module holds the arguments, the config and Keras's hooks. At build
the optimizer decides its `plan.Plan` and makes its `storage.Store`; each
step hands them to a path (`backends`, or the generic step per variable).
"""

import re

import keras

from keras_adam_plus import (
    averaging,
    backends,
    gradients,
    nonfinite,
    plan,
    rule,
    storage,
    validation,
)
from keras_adam_plus.backends import jax_grouped


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
        beta_1: Decay of the first moment, in [0, 1), or a schedule of the
            step (e.g. `BetaDecay`; bias correction then uses the product
            of the betas). Defaults to `0.9`.
        beta_2: Decay of the second moment, as `beta_1`. Defaults to
            `0.999`.
        epsilon: Added to the denominator, > 0. Defaults to `1e-8`.
        epsilon_mode: `"paper"` adds it to `sqrt(v_hat)`, `"hat"` to
            `sqrt(v)` (see above). Defaults to `"paper"`.
        amsgrad: AMSGrad (Reddi et al., 2018): the running maximum of the
            raw `v`, bias-corrected afterwards (torch's order). Defaults
            to `False`.
        bias_correction: Divide the moments by `1 - beta**t`; `False` is
            RMSProp with momentum (Section 6.4). Defaults to `True`.
        adamax: AdaMax (Algorithm 2); not with amsgrad. Defaults to `False`.
        nesterov: Nesterov momentum in the step. Defaults to `False`.
        skip_nonfinite: Skip every step whose gradients hold a NaN or an
            Inf (nothing changes; `skipped_steps` counts them). Defaults to
            `False`.
        average_decay: A float b in [0, 1) keeps the temporal average of
            Section 7.2 (`average_weights()`, `use_average_weights()`);
            `None` off. Defaults to `None`.
        lazy_sparse: TensorFlow: sparse gradients update only their rows
            (LazyAdam). Defaults to `False`.
        group_small_variables: JAX: variables of at most 8192 elements
            share flat m, v slots, one update per group (faster with many
            small variables). Files and `get_weights` keep the
            per-variable layout; `get_state_tree()` and
            `LossScaleOptimizer` see the flat slots (see
            `keras_adam_plus.backends.jax_grouped`). Defaults to `False`.
        moment_dtype: `None` or `"float32"`: float16/bfloat16 weights keep
            their state in float32. Defaults to `None`.
        weight_decay: `lambda`, a float >= 0, a schedule or `None`.
            Defaults to `None`.
        weight_decay_mode: `"decoupled"`, `"decoupled_unscaled"` or
            `"l2"`. Defaults to `"decoupled"`.
        weight_decay_exclude: Regular expressions; a variable whose path
            or name matches one gets no weight decay. Defaults to `None`.
        clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor: As in
            `keras.optimizers.Optimizer`, validated here.
        gradient_accumulation_steps: An int: average the gradients of this
            many batches per update (`1`, `None`: none). Defaults to `None`.
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
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, epsilon_mode="paper", amsgrad=False,
                 bias_correction=True, adamax=False, nesterov=False,
                 skip_nonfinite=False, average_decay=None, lazy_sparse=False,
                 group_small_variables=False, moment_dtype=None,
                 weight_decay=None, weight_decay_mode="decoupled",
                 weight_decay_exclude=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name="adam_plus",
                 **kwargs):
        arguments = {k: v for k, v in locals().items()
                     if k not in ("self", "kwargs", "__class__")}
        base, own = validation.arguments(**arguments)
        super().__init__(**base, **kwargs)
        for key, value in own.items():
            setattr(self, key, value)
        # How m, v and v_max are stored (`storage.Format`), set before build.
        self._state_format = storage.NATIVE
        self._pending_state = None  # a state loaded before build
        self._step = None  # this step's `plan.Step`, while it runs

    def build(self, var_list):
        """Makes the plan and the store (every slot) for `var_list`.

        A state loaded before the optimizer was built is assigned here.
        """
        if self.built:
            return
        storage.check_floating(var_list)
        super().build(var_list)
        self._plan = self._make_plan(var_list, built=True)
        self._store = storage.Store(
            self._plan, var_list, self.add_variable,
            (self.assign, self.assign_add, self.assign_sub), self.name,
            self.iterations.dtype)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            if isinstance(pending, list):  # pickled by 0.1.0: values only
                pending = (pending, None)
            storage.assign_pending(self._face(), *pending)

    def _make_plan(self, var_list, built=False):
        """The `plan.Plan` for `var_list` (a preview when not `built`)."""
        decays = tuple(self._decays_variable(v) for v in var_list)
        generic = getattr(self, "_force_generic", None)  # tests compare
        if type(self).update_step is not AdamPlus.update_step:
            generic = f"{type(self).__name__} overrides update_step"
        groups = backends.slot_groups(var_list, decays, jax_grouped.MAX_SIZE
                                      if self.group_small_variables and built
                                      and not generic else 0)
        hyper = rule.Hyper(self.beta_1, self.beta_2, self.epsilon,
                           self.epsilon_mode, self.amsgrad,
                           self.bias_correction, self.adamax, self.nesterov,
                           self.weight_decay_mode)
        return plan.Plan(
            hyper, self.weight_decay, decays, groups, self._state_format,
            self.moment_dtype, self.lazy_sparse, self.skip_nonfinite,
            self.average_decay, generic)

    def _face(self):
        """The state as every saving route sees it (`storage.Face`)."""
        scalars = {"iteration": self.iterations}
        if isinstance(self._learning_rate, keras.Variable):
            scalars["learning_rate"] = self._learning_rate
        store = getattr(self, "_store", None)
        own = list(self.variables)
        return storage.Face(
            self.name, store.entries(own) if store else own, own,
            list(getattr(self, "_trainable_variables", [])), scalars,
            self._pending_state, self.built)

    # ------------------------------------------------------------- step --

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
        step.run([gradient], [variable], self._store.slots(index),
                 self._plan.decays[index])

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
        store = self._store
        if store.averages is not None:  # once per real step
            averaging.update(store, trainable_variables,
                             self._get_variable_index)
        for beta, power in zip((self.beta_1, self.beta_2),
                               store.beta_powers or ()):
            # Once per real step, after every variable used the old value.
            now = plan.beta_now(beta, self.iterations)
            store.assign(power, power * rule.as_dtype(now, power.dtype))

    def apply(self, grads, trainable_variables=None):
        """Applies one step; see `keras.optimizers.Optimizer.apply`.

        With `skip_nonfinite=True`, a step whose gradients hold a NaN or an
        Inf (on any replica) leaves every variable as it was and adds 1 to
        `skipped_steps`, eager or compiled (`keras_adam_plus.nonfinite`).
        """
        store = getattr(self, "_store", None)
        if not self.skip_nonfinite or (store is not None and store.checked):
            return super().apply(grads, trainable_variables)
        if trainable_variables is not None and not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        nonfinite.apply(self._skip(), lambda g: super(AdamPlus, self).apply(
            g, trainable_variables), list(grads))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """`Optimizer.stateless_apply`, with the skip of `apply`."""
        def step():
            return super(AdamPlus, self).stateless_apply(
                optimizer_variables, grads, trainable_variables)

        if not self.skip_nonfinite or self._store.checked:
            return step()
        return nonfinite.stateless_apply(self._skip(), step,
                                         optimizer_variables, grads,
                                         trainable_variables)

    def _skip(self):
        by_keras = bool(self.use_ema and self.ema_overwrite_frequency)
        return nonfinite.Skip(self._store, self._trainable_variables,
                              self.variables, by_keras)

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

    def _decays_variable(self, variable):
        """Whether weight decay applies to `variable` (decided at build)."""
        if not self.weight_decay:
            return False
        for pattern in self.weight_decay_exclude:
            for label in (getattr(variable, "path", ""), variable.name):
                if re.search(pattern, label):
                    return False
        return self._use_weight_decay(variable)  # exclude_from_weight_decay

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
        """Which update this optimizer runs on the current backend.

        `"torch_fused"` (torch's fused multi-tensor Adam kernel), on JAX
        `"jax_grouped (...)"` with `group_small_variables`, else
        `"generic"` (`update_step` per variable, compiled by XLA under
        `jit_compile` and on JAX), followed by the reason where a fast path
        exists but this configuration falls back.
        """
        built = self.built and hasattr(self, "_plan")
        variables = list(getattr(self, "_trainable_variables", []))
        return backends.describe(self._plan if built else self._make_plan(
            variables), variables, getattr(self, "_store", None))

    def average_weights(self, var_list=None):
        """Bias-corrected averages theta_bar / (1 - b**t) (Section 7.2).

        One tensor per variable of `var_list` (default: the variables the
        optimizer was built with); before the first step, their values.
        """
        if self.average_decay is None:
            raise ValueError("average_weights() needs AdamPlus(average_decay"
                             "=...). Received: average_decay=None")
        return averaging.corrected(
            self._store, self.iterations, self._trainable_variables
            if var_list is None else list(var_list), self._get_variable_index)

    def use_average_weights(self, var_list=None):
        """Context manager: the variables hold their averages inside it.

        `with optimizer.use_average_weights(): model.evaluate(...)`; on exit
        the trained weights come back exactly.
        """
        return averaging.Swap(self.average_weights, self._trainable_variables
                              if var_list is None else var_list)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients (a saved variable), or
        `None` before build or without `skip_nonfinite`."""
        store = getattr(self, "_store", None)
        return store.skipped if store is not None else None

    # ------------------------------------------------------------ config --

    def get_config(self):
        """Returns the JSON-serializable config; every key is an argument."""
        config = super().get_config()
        for key in ("beta_1", "beta_2", "epsilon", "epsilon_mode", "amsgrad",
                    "bias_correction", "adamax", "nesterov", "skip_nonfinite",
                    "average_decay", "lazy_sparse", "group_small_variables",
                    "moment_dtype", "weight_decay", "weight_decay_mode"):
            config[key] = _serialize_schedule(getattr(self, key))
        config["weight_decay_exclude"] = list(self.weight_decay_exclude)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Builds an AdamPlus from `get_config()`, schedules included."""
        config = dict(config)
        for name in ("beta_1", "beta_2", "weight_decay"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)

    def save_own_variables(self, store):
        """Saves the state by index (as Keras does) and the kind of each."""
        storage.save(self._face(), store)

    def load_own_variables(self, store):
        """Loads a saved state: all of it, or nothing (it raises).

        Values are matched by kind and shape (momentum, velocity, ...): a
        state of another configuration is refused, never misplaced. Before
        build the state is kept and assigned at build.
        """
        values, saved_kinds = storage.read_store(store)
        face = self._face()
        if self.built:
            return storage.assign(face, values, saved_kinds)
        storage.check_kinds_before_build(self.name, saved_kinds,
                                         self._state_kinds())
        # The step count and learning rate exist before build: assigned
        # now (a later `optimizer.learning_rate = ...` wins).
        storage.assign_scalars(face.scalars, values, saved_kinds)
        self._pending_state = (values, saved_kinds)

    def _state_kinds(self):
        """The kinds of state this configuration keeps (see `storage`)."""
        optional = {
            "learning_rate": isinstance(self._learning_rate, keras.Variable),
            "velocity_max": self.amsgrad,
            storage.AVERAGE: self.average_decay is not None,
            "beta_1_power": self._make_plan(()).betas_scheduled,
            "beta_2_power": self._make_plan(()).betas_scheduled,
            "skipped_steps": self.skip_nonfinite, "average": self.use_ema,
            "gradient_accumulator": bool(self.gradient_accumulation_steps)}
        return {"iteration", "momentum", "velocity"} | {
            k for k, on in optional.items() if on}

    def get_weights(self):
        """The state as NumPy arrays in the per-variable layout (the step
        count, then the slots in Keras's order), whatever the grouping."""
        return storage.numpy_values(self._face().entries)

    def set_weights(self, weights):
        """Assigns `get_weights()`'s arrays (or the legacy `.h5` layout of
        `variables`), all or none: shapes are checked before any write."""
        if not self.built:
            return super().set_weights(weights)  # Keras's error
        storage.set_weights(self._face(), weights)

    def __reduce__(self):
        # Pickle keeps the config and, once built, the state; the state is
        # assigned when the unpickled optimizer is built.
        state = storage.snapshot(self._face()) if (
            self.built or self._pending_state is not None) else None
        return _unpickle, (self.__class__, self.get_config(), state)


# Short names for `compile(optimizer="adam_plus")`: Keras resolves a string
# identifier through its global custom objects, a public dict for updates.
for _alias in ("adam_plus", "AdamPlus"):
    keras.saving.get_custom_objects().setdefault(_alias, AdamPlus)


def _serialize_schedule(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value  # a float, or a plain callable (not JSON, as in Keras)


def _unpickle(cls, config, state):
    optimizer = cls.from_config(config)
    if isinstance(state, tuple):
        storage.assign_scalars(optimizer._face().scalars, *state)
    optimizer._pending_state = state
    return optimizer
