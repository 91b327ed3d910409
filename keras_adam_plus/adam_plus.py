"""AdamPlus: Adam (Kingma & Ba, 2015) for Keras 3, exact and validated."""

import re

import keras
from keras import ops

from keras_adam_plus import (
    averaging,
    backends,
    gradients,
    nonfinite,
    rule,
    storage,
    validation,
)

EPSILON_MODES = ("paper", "hat")
MOMENT_DTYPES = ("float32",)
WEIGHT_DECAY_MODES = ("decoupled", "decoupled_unscaled", "l2")


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
    `epsilon * sqrt(1 - beta_2**t)`, so with a constant epsilon they differ
    in the first steps and on coordinates whose `v` is tiny. Use
    `epsilon_mode="hat", epsilon=1e-7` to reproduce `keras.optimizers.Adam`
    exactly; the default (`"paper"`, `1e-8`) follows the paper, PyTorch and
    optax. With `bias_correction=False` both modes use `m` and `v` as they
    are, which is RMSProp with momentum (the paper's Section 6.4).

    Weight decay (`lambda = weight_decay`), applied before the Adam step:

    ```
    "decoupled":          theta = theta - alpha * lambda * theta  # Keras AdamW
    "decoupled_unscaled": theta = theta - lambda * theta          # L&H 2019
    "l2":                 g = g + lambda * theta                  # torch Adam
    ```

    Args:
        learning_rate: The step size alpha: a float (ints and NumPy scalars
            are converted), a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments. Must be finite and >= 0. Defaults to
            `0.001`.
        beta_1: Exponential decay rate of the first moment, in [0, 1), or
            a schedule: a `LearningRateSchedule` (e.g. `BetaDecay`, the
            paper's Theorem 4.1 schedule) or a callable of the step
            (0-based), giving the beta of each step. Scheduled betas are
            bias-corrected by `1 - prod(beta_i)` over the steps taken (kept
            in the saved variables `beta_1_power`, `beta_2_power`).
            Defaults to `0.9`.
        beta_2: Exponential decay rate of the second moment, in [0, 1), or
            a schedule as for `beta_1`. Defaults to `0.999`.
        epsilon: Small constant added to the denominator, finite and > 0.
            Defaults to `1e-8`.
        epsilon_mode: `"paper"` adds `epsilon` to `sqrt(v_hat)` (Algorithm
            1); `"hat"` adds it to `sqrt(v)` and folds the bias correction
            into the step size (the paper's "epsilon hat", as in
            `keras.optimizers.Adam`). Defaults to `"paper"`.
        amsgrad: Whether to use AMSGrad (Reddi et al., 2018): the running
            maximum of the raw second moment `v`, bias-corrected afterwards
            (PyTorch's ordering). Defaults to `False`.
        bias_correction: Whether to divide the moments by `1 - beta**t`.
            `False` gives RMSProp with momentum. Defaults to `True`.
        adamax: Whether to run AdaMax (Algorithm 2) instead of Adam; then
            `epsilon` and `epsilon_mode` are unused, and `amsgrad` must be
            `False`. Defaults to `False`.
        nesterov: Whether to use Nesterov momentum in the step (with Adam
            or AdaMax). Defaults to `False`.
        moment_dtype: `None` or `"float32"`: keep m, v (v_max and the
            average) of float16/bfloat16 variables in float32, compute the
            update in float32 and cast theta back once per step (Keras keeps
            them in the variable's dtype, where bfloat16's 8-bit mantissa
            loses most of `(1 - beta_2) * g**2`). Defaults to `None`.
        average_decay: If a float b in [0, 1), keep the paper's temporal
            average (Section 7.2) theta_bar = b * theta_bar + (1 - b) *
            theta per real step, with theta_bar_0 = 0; `average_weights()`
            gives theta_bar / (1 - b**t) and `use_average_weights()` swaps
            it in for evaluation or saving (and the trained weights back).
            Kept as a saved slot per variable. `None`: off.
        lazy_sparse: TensorFlow only: for `tf.IndexedSlices` gradients
            (embeddings), update only the touched rows of theta, m and v
            (LazyAdam semantics; weight decay on those rows only). Dense
            gradients, and the JAX and PyTorch backends (where Keras gives
            dense gradients), take the usual step. Not with adamax,
            nesterov or scheduled betas. Defaults to `False`.
        skip_nonfinite: Whether to skip every step whose gradients hold a
            NaN or an Inf: weights, moments, accumulators, EMA and the step
            count stay unchanged, and `skipped_steps` (a saved variable)
            counts the skips. Costs one extra read of the gradients per
            step (see `keras_adam_plus.nonfinite`). Defaults to `False`.
        weight_decay: Weight decay coefficient `lambda`, finite and >= 0, a
            schedule (`LearningRateSchedule` or callable of the step), or
            `None` for none. Defaults to `None`.
        weight_decay_mode: How weight decay is applied: `"decoupled"`,
            `"decoupled_unscaled"` or `"l2"` (see above). Defaults to
            `"decoupled"`.
        weight_decay_exclude: Regular expressions; a variable whose path or
            name matches any of them (`re.search`) gets no weight decay,
            e.g. `["bias", "norm"]`. Kept in the config, so it survives
            save and load. Defaults to `None`.
        clipnorm: If set, each gradient is clipped to this L2 norm (> 0).
        clipvalue: If set, each gradient is clipped to [-clipvalue,
            clipvalue] (> 0).
        global_clipnorm: If set, all gradients are clipped together to this
            global L2 norm (> 0).
        use_ema: Whether to keep Keras's exponential moving average of the
            weights. Defaults to `False`.
        ema_momentum: Momentum of that average, in [0, 1]. Defaults to
            `0.99`.
        ema_overwrite_frequency: Every this many steps (an int >= 1) the
            weights are overwritten with their average; `None` never.
        loss_scale_factor: If set (> 0), the loss is multiplied by it and
            the gradients divided by it.
        gradient_accumulation_steps: If an int > 1, gradients are averaged
            over this many batches and the update (bias correction and
            weight decay included) happens once per that many batches.
            `1` and `None` mean no accumulation. Defaults to `None`.
        name: Name of the optimizer and prefix of its variables. Defaults
            to `"adam_plus"`.

    Example:

    >>> import keras, numpy as np
    >>> from keras_adam_plus import AdamPlus
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=AdamPlus(learning_rate=1e-2), loss="mse")
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR
        2015, https://arxiv.org/abs/1412.6980.
        Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR
        2018 (AMSGrad).
        Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016
        workshop (Nesterov).
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR
        2019, https://arxiv.org/abs/1711.05101.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        epsilon_mode="paper",
        amsgrad=False,
        bias_correction=True,
        adamax=False,
        nesterov=False,
        skip_nonfinite=False,
        average_decay=None,
        lazy_sparse=False,
        moment_dtype=None,
        weight_decay=None,
        weight_decay_mode="decoupled",
        weight_decay_exclude=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="adam_plus",
        **kwargs,
    ):
        v = validation
        accumulation = v.check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, 1,
            optional=True,
        )
        positive = dict(low=0.0, low_inclusive=False, optional=True)
        super().__init__(
            learning_rate=v.check_learning_rate(learning_rate),
            weight_decay=v.check_weight_decay(weight_decay),
            clipnorm=v.check_float("clipnorm", clipnorm, **positive),
            clipvalue=v.check_float("clipvalue", clipvalue, **positive),
            global_clipnorm=v.check_float(
                "global_clipnorm", global_clipnorm, **positive
            ),
            use_ema=v.check_bool("use_ema", use_ema),
            ema_momentum=v.check_float(
                "ema_momentum", ema_momentum, low=0.0, high=1.0
            ),
            ema_overwrite_frequency=v.check_int(
                "ema_overwrite_frequency", ema_overwrite_frequency, 1,
                optional=True,
            ),
            loss_scale_factor=v.check_float(
                "loss_scale_factor", loss_scale_factor, **positive
            ),
            # Keras wants None or >= 2; 1 means no accumulation.
            gradient_accumulation_steps=(
                accumulation if accumulation and accumulation > 1 else None
            ),
            name=v.check_name(name),
            **kwargs,
        )
        self.beta_1 = v.check_beta("beta_1", beta_1)
        self.beta_2 = v.check_beta("beta_2", beta_2)
        self.epsilon = v.check_float(
            "epsilon", epsilon, low=0.0, low_inclusive=False
        )
        self.epsilon_mode = v.check_choice(
            "epsilon_mode", epsilon_mode, EPSILON_MODES
        )
        self.amsgrad = v.check_bool("amsgrad", amsgrad)
        self.bias_correction = v.check_bool("bias_correction", bias_correction)
        self.adamax = v.check_bool("adamax", adamax)
        self.nesterov = v.check_bool("nesterov", nesterov)
        self.skip_nonfinite = v.check_bool("skip_nonfinite", skip_nonfinite)
        self.lazy_sparse = v.check_bool("lazy_sparse", lazy_sparse)
        if self.lazy_sparse and (self.adamax or self.nesterov
                                 or self._betas_scheduled
                                 or moment_dtype is not None):
            raise ValueError(
                "Argument `lazy_sparse` supports the Adam and AMSGrad steps "
                "with constant betas, not adamax, nesterov, scheduled "
                "betas or moment_dtype. Received: lazy_sparse=True, "
                f"adamax={self.adamax}, nesterov={self.nesterov}, "
                f"beta_1={self.beta_1!r}, beta_2={self.beta_2!r}, "
                f"moment_dtype={moment_dtype!r}"
            )
        if moment_dtype is not None:
            moment_dtype = v.check_choice("moment_dtype", moment_dtype,
                                          MOMENT_DTYPES)
        self.moment_dtype = moment_dtype
        self.average_decay = v.check_float(
            "average_decay", average_decay, low=0.0, high=1.0,
            high_inclusive=False, optional=True,
        )
        if self.adamax and self.amsgrad:
            raise ValueError(
                "Arguments `adamax` and `amsgrad` cannot both be True: "
                "AdaMax's u = max(beta_2 * u, |g|) is already a running "
                "maximum. Received: adamax=True, amsgrad=True"
            )
        self.weight_decay_mode = v.check_choice(
            "weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES
        )
        self.weight_decay_exclude = v.check_patterns(
            "weight_decay_exclude", weight_decay_exclude
        )
        # How m, v and v_max are stored (`storage.Format`); set before
        # build. The low-bit formats will be chosen by an argument.
        self._state_format = storage.NATIVE
        self._pending_state = None
        self._scalars_cache = None
        self._skip_bypass = False
        self._finite = None  # a bool tensor while a step is guarded

    # ------------------------------------------------------------ build --

    def build(self, var_list):
        """Creates `m`, `v` (and `v_max` with amsgrad) for each variable.

        On JAX, small variables of one dtype and weight decay share flat
        slots (`keras_adam_plus.backends.jax_grouped`).

        Also the temporal average (`average_decay`), the beta products
        (scheduled betas) and `skipped_steps` (`skip_nonfinite`); a state
        loaded before the optimizer was built is assigned here.
        """
        if self.built:
            return
        storage.check_floating(var_list)
        super().build(var_list)
        names = ["momentum", "velocity"] + (
            ["velocity_max"] if self.amsgrad else []
        )
        self._decays = [self._decays_variable(var) for var in var_list]
        self._slot_groups = backends.slot_groups(self, var_list)
        slots = storage.add_slots(self, var_list, names, self.moment_dtype,
                                  groups=self._slot_groups,
                                  fmt=self._state_format)
        self._momentums, self._velocities = slots[0], slots[1]
        self._velocity_maxes = slots[2] if self.amsgrad else None
        self._averages = None
        if self.average_decay is not None:
            self._averages = storage.add_slots(
                self, var_list, [averaging.SLOT], self.moment_dtype)[0]
        self._beta_powers = None
        if self._betas_scheduled:
            # prod_{i<=t} beta_i, the bias correction of scheduled betas,
            # in float64 where a variable is float64.
            dtype = "float64" if any(
                rule.compute_dtype(v.dtype) == "float64" for v in var_list
            ) else "float32"
            self._beta_powers = [
                self.add_variable((), initializer="ones", dtype=dtype,
                                  name=f"beta_{i}_power")
                for i in (1, 2)
            ]
        self._skipped_steps = None
        if self.skip_nonfinite:
            self._skipped_steps = self.add_variable(
                (), initializer="zeros", dtype=self.iterations.dtype,
                name="skipped_steps",
            )
        if self._pending_state is not None:
            pending = self._pending_state
            if isinstance(pending, list):  # pickled by 0.1.0: values only
                pending = (pending, None)
            values, saved_kinds = pending
            self._pending_state = None
            storage.assign_pending(self, values, saved_kinds)

    def _state_kinds(self):
        """The kinds of state this configuration keeps (see `storage`)."""
        kinds = {"iteration", "momentum", "velocity"}
        optional = {
            "learning_rate": isinstance(self._learning_rate, keras.Variable),
            "velocity_max": self.amsgrad,
            averaging.SLOT: self.average_decay is not None,
            "beta_1_power": self._betas_scheduled,
            "beta_2_power": self._betas_scheduled,
            "skipped_steps": self.skip_nonfinite,
            "average": self.use_ema,
            "gradient_accumulator": bool(self.gradient_accumulation_steps),
        }
        return kinds | {k for k, on in optional.items() if on}

    # ------------------------------------------------------------- step --

    @property
    def _betas_scheduled(self):
        return not all(isinstance(b, float) for b in (self.beta_1,
                                                       self.beta_2))

    def _hyper(self):
        return rule.Hyper(
            self.beta_1, self.beta_2, self.epsilon, self.epsilon_mode,
            self.amsgrad, self.bias_correction, self.adamax, self.nesterov,
            self.weight_decay_mode,
        )

    def _beta_now(self, beta, ahead=0):
        return beta(self.iterations + ahead)

    def _step_scalars(self, dtype, learning_rate):
        """This step's `rule.Scalars` in `dtype`, computed once per step."""
        cache = self._scalars_cache
        if cache is not None and dtype in cache:
            return cache[dtype]
        betas = beta_1_next = powers = None
        if self._betas_scheduled:
            betas = [b if isinstance(b, float) else self._beta_now(b)
                     for b in (self.beta_1, self.beta_2)]
            powers = self._beta_powers
            if self.nesterov:
                beta_1_next = (self.beta_1 if isinstance(self.beta_1, float)
                               else self._beta_now(self.beta_1, ahead=1))
        wd = self.weight_decay
        if callable(wd):
            wd = wd(self.iterations)  # a tensor: never test its truth
        elif not wd:
            wd = None
        scalars = rule.step_scalars(
            self._hyper(), dtype, self.iterations, learning_rate,
            betas=betas, beta_1_next=beta_1_next, beta_powers=powers,
            weight_decay=wd,
        )
        if cache is not None:
            cache[dtype] = scalars
        return scalars

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` (see the class docstring)."""
        if self.lazy_sparse and keras.backend.backend() == "tensorflow":
            from keras_adam_plus.backends import tf_lazy

            if tf_lazy.handles(self, gradient):
                tf_lazy.update_step(self, gradient, variable, learning_rate)
                return
        index = self._get_variable_index(variable)
        slots = [self._momentums[index], self._velocities[index],
                 self._velocity_maxes[index] if self.amsgrad else None]
        self._rule_step([gradient], [variable], slots, index, learning_rate)

    def _rule_step(self, grads, variables, slots, index, learning_rate):
        """The rule (`keras_adam_plus.rule`) applied to `variables`.

        One variable with its own slots (`update_step`), or a group of
        variables of one dtype and decay with flat slots (m, v, v_max):
        their gradients and theta are then concatenated, and the decrements
        cut back into each variable's shape. `index` is the first
        variable's (for its weight decay).
        """
        dtype = rule.compute_dtype(
            keras.backend.standardize_dtype(variables[0].dtype))
        s = self._step_scalars(dtype, learning_rate)
        state = storage.SlotState(self, variables, slots, dtype,
                                  self._state_format)
        rule.step(self._hyper(), s,
                  storage.flat([ops.cast(g, dtype) for g in grads]), state,
                  self._decays[index])
        state.finish()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        grads = gradients.conform(grads, trainable_variables)
        self._scalars_cache = {}
        try:
            fast = backends.fast_path(self)
            if fast is not None:
                fast.update(self, grads, trainable_variables, learning_rate)
            else:
                super()._backend_update_step(
                    grads, trainable_variables, learning_rate
                )
        finally:
            self._scalars_cache = None
        if self._averages is not None:
            # Once per real step (not per micro-step, unlike Keras's EMA).
            averaging.update(self, self._averages, trainable_variables)
        if self._beta_powers is not None:
            # Once per real step, after every variable used the old value.
            for beta, power in zip((self.beta_1, self.beta_2),
                                   self._beta_powers):
                now = beta if isinstance(beta, float) else self._beta_now(beta)
                self.assign(power, ops.multiply(
                    power, rule.as_dtype(now, power.dtype)))

    def apply(self, grads, trainable_variables=None):
        """Applies one step; see `keras.optimizers.Optimizer.apply`.

        With `skip_nonfinite=True`, a step whose gradients hold any NaN or
        Inf (on any replica) leaves every variable (weights, moments,
        accumulators, EMA and the step count) as it was and adds 1 to
        `skipped_steps`, eagerly, under `tf.function`, XLA, `jax.jit` and
        `torch.compile` alike (see `keras_adam_plus.nonfinite`).
        """
        if not self.skip_nonfinite or self._skip_bypass:
            return super().apply(grads, trainable_variables)
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True

        def step(step_grads):
            with nonfinite.bypassed(self):
                super(AdamPlus, self).apply(step_grads, trainable_variables)

        nonfinite.apply(self, step, grads)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """`keras.optimizers.Optimizer.stateless_apply`, with the skip.

        With `skip_nonfinite=True`, each write of the step keeps its input
        when a gradient is not finite (see `keras_adam_plus.nonfinite`): a
        skipped step returns the inputs, `skipped_steps` plus one.
        """
        if not self.skip_nonfinite or self._skip_bypass:
            return super().stateless_apply(optimizer_variables, grads,
                                           trainable_variables)
        return nonfinite.stateless_apply(
            self, lambda: super(AdamPlus, self).stateless_apply(
                optimizer_variables, grads, trainable_variables),
            optimizer_variables, grads, trainable_variables,
        )

    # ----------------------------------------------------------- writes --

    def _guarded_variables(self):
        """The variables this class writes only through `assign*`.

        Under `skip_nonfinite` in a traced step those writes select the
        old value on a bad step (see `keras_adam_plus.nonfinite`); Keras
        writes the others itself (the step count, EMA, accumulators, and
        theta where EMA overwrites it).
        """
        slots = [self._momentums, self._velocities, self._velocity_maxes,
                 self._averages, self._beta_powers]
        result = list({id(s): s for group in slots if group for s in (
            x.flat if isinstance(x, storage.GroupSlice) else x
            for x in group) if s is not None}.values())
        if not (self.use_ema and self.ema_overwrite_frequency):
            # Keras assigns a variable with `overwrite_with_gradient` (float8
            # scales) its gradient itself.
            result += [v for v in self._trainable_variables
                       if not getattr(v, "overwrite_with_gradient", False)]
        return result

    def assign(self, variable, value):
        """`Optimizer.assign`; keeps the old value on a skipped step."""
        if self._finite is not None:
            value = nonfinite.keep(self._finite, variable, value)
        super().assign(variable, value)

    def assign_add(self, variable, value):
        """`Optimizer.assign_add`; keeps the old value on a skipped step."""
        if self._finite is not None:
            return self.assign(variable, ops.add(
                variable, ops.cast(value, variable.dtype)))
        super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        """`Optimizer.assign_sub`; keeps the old value on a skipped step."""
        if self._finite is not None:
            return self.assign(variable, ops.subtract(
                variable, ops.cast(value, variable.dtype)))
        super().assign_sub(variable, value)

    # Keras's checks of each step's variable list, run once per list: each
    # is a Python loop over the variables (~0.2 ms a step at 1000 of them
    # on this CPU, 3% of torch's step there; more of a GPU step, which is
    # shorter). Both facts are fixed at build (`build` already gives
    # overwritten variables no slots).

    def _check_variables_are_known(self, variables):
        storage.per_variables(
            self, "_known_cache", variables,
            lambda: super(AdamPlus, self)._check_variables_are_known(
                variables) or True)

    def _overwrite_variables_directly_with_gradients(self, grads, vars):
        if not storage.per_variables(
                self, "_overwrite_cache", vars, lambda: any(
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
        # Also honour Keras's exclude_from_weight_decay().
        return self._use_weight_decay(variable)

    def _apply_weight_decay(self, variables):
        # Every weight decay mode is applied in update_step instead.
        return

    def _get_current_learning_rate(self):
        # Schedules see real steps, not micro-steps of gradient accumulation
        # (Keras passes the micro-step count).
        schedule = keras.optimizers.schedules.LearningRateSchedule
        if isinstance(self._learning_rate, schedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    @property
    def fast_path(self):
        """Which update this optimizer runs on the current backend.

        `"torch_fused"` on the PyTorch backend (torch's fused multi-tensor
        Adam kernel, see `keras_adam_plus.backends.torch_fused`); on JAX
        `"jax_grouped (...)"` once built with groups of small variables
        sharing flat slots (`keras_adam_plus.backends.jax_grouped`); else
        `"generic"` (`update_step` per variable, compiled by XLA under
        `jit_compile` on TensorFlow and always on JAX), followed by the
        reason where a fast path exists but this configuration falls back.
        """
        return backends.describe(self)

    # --------------------------------------------------------- averaging --

    def average_weights(self, var_list=None):
        """Bias-corrected averages theta_bar / (1 - b**t) (Section 7.2).

        Returns one tensor per variable of `var_list` (default: the
        variables the optimizer was built with); before the first step,
        the variables' own values. Needs `average_decay`.
        """
        if self.average_decay is None:
            raise ValueError(
                "average_weights() needs AdamPlus(average_decay=...). "
                "Received: average_decay=None"
            )
        variables = (self._trainable_variables if var_list is None
                     else list(var_list))
        return averaging.corrected(self, self._averages, variables)

    def use_average_weights(self, var_list=None):
        """Context manager: the variables hold their averages inside it.

        `with optimizer.use_average_weights(): model.evaluate(...)` or
        `model.save(...)`; on exit the trained weights come back exactly.
        """
        return averaging.Swap(self, var_list)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients (`skip_nonfinite=True`).

        A saved optimizer variable; `None` before `build` or when
        `skip_nonfinite` is off.
        """
        return getattr(self, "_skipped_steps", None)

    # ------------------------------------------------------------ config --

    def get_config(self):
        """Returns the JSON-serializable config; every key is an argument."""
        config = super().get_config()
        config.update(
            {
                "beta_1": _serialize_schedule(self.beta_1),
                "beta_2": _serialize_schedule(self.beta_2),
                "epsilon": self.epsilon,
                "epsilon_mode": self.epsilon_mode,
                "amsgrad": self.amsgrad,
                "bias_correction": self.bias_correction,
                "adamax": self.adamax,
                "nesterov": self.nesterov,
                "skip_nonfinite": self.skip_nonfinite,
                "average_decay": self.average_decay,
                "lazy_sparse": self.lazy_sparse,
                "moment_dtype": self.moment_dtype,
                "weight_decay": _serialize_schedule(self.weight_decay),
                "weight_decay_mode": self.weight_decay_mode,
                "weight_decay_exclude": list(self.weight_decay_exclude),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Builds an AdamPlus from `get_config()`, schedules included."""
        config = dict(config)
        for name in ("beta_1", "beta_2", "weight_decay"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name], custom_objects=custom_objects
                )
        return super().from_config(config, custom_objects=custom_objects)

    def save_own_variables(self, store):
        """Saves the state by index (as Keras does) and the kind of each."""
        storage.save(self, store)

    def load_own_variables(self, store):
        """Loads a saved state: all of it, or nothing (it raises).

        The state is matched by the kind and shape of each value (momentum,
        velocity, ...), so a state saved under another configuration is
        refused, never loaded into the wrong slots. Into an optimizer that
        is not built yet (`compile` then `load_weights`), the state is kept
        and assigned when the optimizer is built. A load that raises
        changes nothing, and so `load_weights(skip_mismatch=True)` loads
        either the whole optimizer state or none of it (Keras then warns).
        Files saved before the kinds were recorded load by count and shape.
        """
        values, saved_kinds = storage.read_store(store)
        if not self.built:
            storage.check_kinds_before_build(self, saved_kinds,
                                             self._state_kinds())
            # The step count and learning rate exist before build: assign
            # them now (a later `optimizer.learning_rate = ...` wins); the
            # slots wait for build.
            storage.assign_scalars(self, values, saved_kinds)
            self._pending_state = (values, saved_kinds)
            return
        storage.assign(self, values, saved_kinds)

    def get_weights(self):
        """The state as NumPy arrays, one per variable and kind.

        The per-variable layout whatever the backend keeps (JAX's groups
        share flat slots): the step count, then the slots in Keras's
        order, as an optimizer without groups holds them.
        """
        return storage.numpy_values(storage.entries(self))

    def set_weights(self, weights):
        """Assigns `get_weights()`'s arrays, all of them or none (raises).

        Also takes this optimizer's own `variables` layout (what the legacy
        `.h5` format saves). Shapes are checked before anything is written.
        """
        if not self.built:
            return super().set_weights(weights)  # Keras's error
        storage.set_weights(self, weights)

    def __reduce__(self):
        # Pickle keeps the config and, once built, the state; the state is
        # assigned when the unpickled optimizer is built.
        state = storage.snapshot(self) if (
            self.built or self._pending_state is not None) else None
        return _unpickle, (self.__class__, self.get_config(), state)


# Short names for `compile(optimizer="adam_plus")` and
# `keras.optimizers.get("adam_plus")`: Keras resolves a string identifier
# through its global custom objects, a public dictionary meant for updates.
for _alias in ("adam_plus", "AdamPlus"):
    keras.saving.get_custom_objects().setdefault(_alias, AdamPlus)


def _serialize_schedule(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value  # a float, or a plain callable (not JSON, as in Keras)


def _unpickle(cls, config, state):
    optimizer = cls.from_config(config)
    if isinstance(state, tuple):
        storage.assign_scalars(optimizer, *state)
    optimizer._pending_state = state
    return optimizer
