"""AdamPlus: Adam (Kingma & Ba, 2015) for Keras 3, exact and validated."""

import re

import keras
from keras import ops

from keras_adam_plus import validation

EPSILON_MODES = ("paper", "hat")
MOMENT_DTYPES = ("float32",)
LOW_PRECISION = ("float16", "bfloat16")
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
            counts the skips. Costs one copy of the state per step.
            Defaults to `False`.
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
        super().__init__(
            learning_rate=v.check_learning_rate(learning_rate),
            weight_decay=v.check_weight_decay(weight_decay),
            clipnorm=v.check_float(
                "clipnorm", clipnorm, low=0.0, low_inclusive=False,
                optional=True,
            ),
            clipvalue=v.check_float(
                "clipvalue", clipvalue, low=0.0, low_inclusive=False,
                optional=True,
            ),
            global_clipnorm=v.check_float(
                "global_clipnorm", global_clipnorm, low=0.0,
                low_inclusive=False, optional=True,
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
                "loss_scale_factor", loss_scale_factor, low=0.0,
                low_inclusive=False, optional=True,
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
        self._pending_state = None

    def build(self, var_list):
        """Creates `m`, `v` (and `v_max` with amsgrad) for each variable."""
        if self.built:
            return
        super().build(var_list)
        names = ["momentum", "velocity"] + (
            ["velocity_max"] if self.amsgrad else []
        )
        slots = self._add_slots(var_list, names)
        self._momentums, self._velocities = slots[0], slots[1]
        self._velocity_maxes = slots[2] if self.amsgrad else None
        self._decays = [self._decays_variable(var) for var in var_list]
        self._averages = None
        if self.average_decay is not None:
            self._averages = self._add_slots(var_list, ["average"])[0]
        self._beta_powers = None
        if self._betas_scheduled:
            # prod_{i<=t} beta_i, the bias correction of scheduled betas.
            self._beta_powers = [
                self.add_variable((), initializer="ones", dtype="float32",
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
            self._assign_state(self._pending_state)
            self._pending_state = None

    def _weight_decay_now(self, dtype):
        """The weight decay of this step: a schedule is called with it."""
        wd = self.weight_decay
        if callable(wd):
            wd = wd(self.iterations)
        return ops.cast(wd, dtype)

    def _state_dtype(self, variable):
        """The dtype of `variable`'s slots and update computation."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if self.moment_dtype and dtype in LOW_PRECISION:
            return self.moment_dtype
        return dtype

    def _add_slots(self, var_list, names):
        """One slot list per name; in `moment_dtype` for low-precision vars."""
        if self.moment_dtype is None:
            return self.add_optimizer_variables(var_list, names)
        return [
            [
                None if getattr(var, "overwrite_with_gradient", False)
                else self.add_variable(
                    tuple(var.shape), initializer="zeros",
                    dtype=self._state_dtype(var),
                    name=f"{var.path.replace('/', '_')}_{name}",
                )
                for var in var_list
            ]
            for name in names
        ]

    @property
    def _betas_scheduled(self):
        return not all(isinstance(b, float) for b in (self.beta_1,
                                                       self.beta_2))

    def _beta(self, which, dtype, ahead=0):
        """beta_1 or beta_2 at this step (+ `ahead`), in `dtype`."""
        beta = self.beta_1 if which == 1 else self.beta_2
        if isinstance(beta, float):
            return ops.cast(beta, dtype)
        return ops.cast(beta(self.iterations + ahead), dtype)

    def _corrections(self, dtype):
        """(1 - beta_1**t, 1 - beta_2**t, 1 - beta_1**(t+1)) in `dtype`.

        The third (Nesterov's look-ahead) is `None` without `nesterov`.
        With scheduled betas, products of the betas actually used (kept in
        `beta_1_power`, `beta_2_power`) replace the powers: the weights of
        m and v then still sum to 1 after correction.
        """
        one = ops.cast(1.0, dtype)
        if not self.bias_correction:
            return one, one, one
        if not self._betas_scheduled:
            t = ops.cast(self.iterations + 1, dtype)
            beta_1 = ops.cast(self.beta_1, dtype)
            return (1 - ops.power(beta_1, t),
                    1 - ops.power(ops.cast(self.beta_2, dtype), t),
                    one - ops.power(beta_1, t + 1) if self.nesterov
                    else None)
        p1, p2 = (ops.cast(p, dtype) for p in self._beta_powers)
        p1 = ops.multiply(p1, self._beta(1, dtype))
        p2 = ops.multiply(p2, self._beta(2, dtype))
        ahead = (one - ops.multiply(p1, self._beta(1, dtype, ahead=1))
                 if self.nesterov else None)
        return one - p1, one - p2, ahead

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
        t = ops.cast(self.iterations, "float32")
        correction = 1.0 - ops.power(
            ops.cast(self.average_decay, "float32"), t)
        averaged = []
        for variable in variables:
            average = self._averages[self._get_variable_index(variable)]
            corrected = ops.divide(
                average, ops.maximum(ops.cast(correction, average.dtype),
                                     ops.cast(1e-30, average.dtype)))
            averaged.append(ops.where(ops.greater(t, 0.0), corrected,
                                      ops.convert_to_tensor(variable)))
        return averaged

    def use_average_weights(self, var_list=None):
        """Context manager: the variables hold their averages inside it.

        `with optimizer.use_average_weights(): model.evaluate(...)` or
        `model.save(...)`; on exit the trained weights come back exactly.
        """
        return _AverageSwap(self, var_list)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients (`skip_nonfinite=True`).

        A saved optimizer variable; `None` before `build` or when
        `skip_nonfinite` is off.
        """
        return getattr(self, "_skipped_steps", None)

    def apply(self, grads, trainable_variables=None):
        """Applies one step; see `keras.optimizers.Optimizer.apply`.

        With `skip_nonfinite=True`, a step whose gradients hold any NaN or
        Inf leaves every variable (weights, moments, accumulators, EMA and
        the step count) as it was and adds 1 to `skipped_steps`. Without
        control flow (a select per variable), so it runs inside
        `tf.function`, XLA and `jax.jit` alike.
        """
        if not self.skip_nonfinite:
            return super().apply(grads, trainable_variables)
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        variables = (self._trainable_variables if trainable_variables is None
                     else trainable_variables)
        finite = _all_finite(grads)
        state = [v for v in list(variables) + list(self.variables)
                 if v is not self._skipped_steps]
        saved = [ops.copy(v.value) for v in state]
        super().apply(grads, trainable_variables)
        for variable, old in zip(state, saved):
            variable.assign(ops.where(finite, variable.value, old))
        self._skipped_steps.assign_add(
            ops.cast(ops.logical_not(finite), self._skipped_steps.dtype)
        )

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
        Adam kernel, see `keras_adam_plus.backends.torch_fused`), else
        `"generic"` (`update_step` per variable, compiled by XLA under
        `jit_compile` on TensorFlow and always on JAX), followed by the
        reason where a fast path exists but this configuration falls back.
        """
        fast = _fast_path_module()
        if fast is None:
            return "generic"
        reason = fast.fallback_reason(self)
        if reason is None:
            return fast.__name__.rsplit(".", 1)[-1]
        return f"generic ({reason})"

    def _fast_path_blocker(self):
        # Modes with no fused form, and subclasses that change the update,
        # return a reason here (subclasses may add their own).
        if type(self).update_step is not AdamPlus.update_step:
            return f"{type(self).__name__} overrides update_step"
        if self.adamax:
            return "adamax has no fused torch kernel"
        if self.nesterov:
            return "nesterov has no fused torch kernel"
        if self._betas_scheduled:
            return "scheduled betas have no fused torch kernel"
        if callable(self.weight_decay):
            return "a scheduled weight decay has no fused torch kernel"
        if self.moment_dtype is not None and any(
            self._state_dtype(var) != keras.backend.standardize_dtype(
                var.dtype)
            for var in getattr(self, "_trainable_variables", [])
        ):
            return ("moment_dtype: the fused kernel keeps state in the "
                    "parameters' dtype")
        return None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        fast = _fast_path_module()
        if fast is not None and fast.fallback_reason(self) is None:
            fast.update(self, grads, trainable_variables, learning_rate)
        else:
            super()._backend_update_step(
                grads, trainable_variables, learning_rate
            )
        if self._averages is not None:
            # Section 7.2: theta_bar = b * theta_bar + (1 - b) * theta, once
            # per real step (this runs only on real steps under gradient
            # accumulation, unlike Keras's EMA).
            for variable in trainable_variables:
                average = self._averages[self._get_variable_index(variable)]
                decay = ops.cast(self.average_decay, average.dtype)
                self.assign(average, ops.add(
                    ops.multiply(average, decay),
                    ops.multiply(ops.cast(variable, average.dtype),
                                 ops.cast(1 - self.average_decay,
                                          average.dtype))))
        if self._beta_powers is not None:
            # Once per real step, after every variable used the old value.
            for which, power in zip((1, 2), self._beta_powers):
                power.assign(ops.multiply(power, self._beta(which,
                                                            "float32")))

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` (see the class docstring)."""
        if self.lazy_sparse and keras.backend.backend() == "tensorflow":
            from keras_adam_plus.backends import tf_lazy

            if tf_lazy.handles(self, gradient):
                tf_lazy.update_step(self, gradient, variable, learning_rate)
                return
        index = self._get_variable_index(variable)
        target = _Target(self, variable, self._state_dtype(variable))
        self._update(gradient, target, index, learning_rate)
        target.finish()

    def _update(self, gradient, target, index, learning_rate):
        """The update of one variable, written through `target`."""
        dtype = target.dtype
        variable = target.value
        m = self._momentums[index]
        v = self._velocities[index]
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        # Constants in the variable's dtype: a bare Python float would be
        # rounded to float32 first on some backends (float64 variables).
        if self._betas_scheduled:
            one = ops.cast(1.0, dtype)
            one_minus_beta_1 = one - self._beta(1, dtype)
            one_minus_beta_2 = one - self._beta(2, dtype)
        else:
            one_minus_beta_1 = ops.cast(1 - self.beta_1, dtype)
            one_minus_beta_2 = ops.cast(1 - self.beta_2, dtype)
        epsilon = ops.cast(self.epsilon, dtype)

        if self._decays[index]:
            wd = self._weight_decay_now(dtype)
            if self.weight_decay_mode == "l2":
                gradient = ops.add(gradient, ops.multiply(wd, variable))
            elif self.weight_decay_mode == "decoupled":
                # Same operation order as Keras's base optimizer.
                target.sub(variable * wd * lr)
            else:
                target.sub(ops.multiply(variable, wd))

        self.assign_add(
            m, ops.multiply(ops.subtract(gradient, m), one_minus_beta_1)
        )
        if self.adamax:
            # Algorithm 2: u = max(beta_2 * u, |g|), kept in the v slot.
            beta_2 = self._beta(2, dtype)
            self.assign(
                v, _maximum(ops.multiply(v, beta_2), ops.abs(gradient))
            )
        else:
            self.assign_add(
                v,
                ops.multiply(
                    ops.subtract(ops.square(gradient), v), one_minus_beta_2
                ),
            )
        if self.amsgrad:
            v_max = self._velocity_maxes[index]
            self.assign(v_max, _maximum(v_max, v))
            v = v_max

        if self.adamax or self.nesterov:
            self._assign_general_step(target, gradient, m, v, lr, epsilon)
            return

        if not self.bias_correction:
            # Section 6.4: RMSProp with momentum; both modes coincide.
            target.sub(
                ops.divide(ops.multiply(m, lr), ops.add(ops.sqrt(v), epsilon))
            )
            return

        correction_1, correction_2, _ = self._corrections(dtype)
        alpha = lr * ops.sqrt(correction_2) / correction_1
        if self.epsilon_mode == "paper":
            # Algorithm 1, rearranged as the end of Section 2 suggests:
            # m_hat / (sqrt(v_hat) + eps) = sqrt(c2) / c1 * m / (sqrt(v) +
            # eps * sqrt(c2)). The same value, with the elementwise work of
            # the "hat" form (one division), so no slower than Keras's Adam.
            epsilon = ops.multiply(epsilon, ops.sqrt(correction_2))
        # The "hat" form in keras.optimizers.Adam's operation order.
        target.sub(
            ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), epsilon))
        )

    def _assign_general_step(self, target, gradient, m, v, lr, epsilon):
        """The step of the AdaMax and Nesterov modes (m, v already updated).

        numerator: m_hat, or with Nesterov (optax's form)
            beta_1 * m / (1 - beta_1**(t+1)) + (1 - beta_1) * g / c1
        denominator: u (AdaMax; 1 where u == 0, where m == 0 too), else
            sqrt(v_hat) + eps ("paper") or (sqrt(v) + eps) / sqrt(c2)
            ("hat"), with c1 = 1 - beta_1**t and c2 = 1 - beta_2**t.
        """
        dtype = target.dtype
        # Tensors, not Variables: jnp.where refuses Keras Variables.
        m, v = ops.convert_to_tensor(m), ops.convert_to_tensor(v)
        beta_1 = self._beta(1, dtype)
        one = ops.cast(1.0, dtype)
        c1, c2, c1_next = self._corrections(dtype)
        if self.nesterov:
            numerator = ops.add(
                ops.multiply(m, beta_1 / c1_next),
                ops.multiply(gradient, (one - beta_1) / c1),
            )
        else:
            numerator = ops.divide(m, c1)
        if self.adamax:
            zero = ops.zeros((), dtype)
            denominator = ops.where(ops.greater(v, zero), v, one)
            step = ops.multiply(ops.divide(numerator, denominator), lr)
        else:
            if self.epsilon_mode == "paper":
                epsilon = ops.multiply(epsilon, ops.sqrt(c2))
            step = ops.divide(ops.multiply(numerator, lr * ops.sqrt(c2)),
                              ops.add(ops.sqrt(v), epsilon))
        target.sub(step)

    def get_config(self):
        """Returns the JSON-serializable config; every key is an argument."""
        config = super().get_config()
        config.update(
            {
                "beta_1": _serialize_beta(self.beta_1),
                "beta_2": _serialize_beta(self.beta_2),
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
                "weight_decay": _serialize_beta(self.weight_decay),
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

    def load_own_variables(self, store):
        """Loads saved state; a state that does not fit raises, never skips.

        Keras only warns and keeps fresh moments when the number of saved
        optimizer variables differs from this optimizer's; AdamPlus raises
        a `ValueError` saying what differs.
        """
        saved = len(store.keys())
        mine = len(self.variables)
        if saved != mine:
            hint = (
                " The optimizer is not built yet: call "
                "`optimizer.build(model.trainable_variables)` first."
                if not self.built
                else " Check that amsgrad, use_ema and "
                "gradient_accumulation_steps match the saved optimizer's "
                "and that the model has the same trainable variables."
            )
            raise ValueError(
                f"Cannot load the state of optimizer '{self.name}': the saved "
                f"state has {saved} variables, this optimizer has {mine}."
                + hint
            )
        self._assign_state([store[str(i)] for i in range(saved)])

    def _assign_state(self, values):
        for variable, value in zip(self.variables, values):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load the state of optimizer '{self.name}': "
                    f"variable {variable.path} has shape {variable.shape}, "
                    f"the saved value has shape {value.shape}."
                )
            variable.assign(value)

    def __reduce__(self):
        # Pickle keeps the config and, once built, the state; the state is
        # assigned when the unpickled optimizer is built.
        state = [v.numpy() for v in self.variables] if self.built else None
        return _unpickle, (self.__class__, self.get_config(), state)


def _maximum(x, y):
    """Elementwise max that keeps float64 on every backend.

    Keras 3.15's `ops.maximum` on the torch backend computes float64 inputs
    in float32 (its result_type does not recognise torch dtypes and falls
    back to floatx); `where` keeps the inputs' dtype.
    """
    if keras.backend.backend() == "torch":
        return ops.where(ops.greater(y, x), y, x)
    return ops.maximum(x, y)


class _Target:
    """Where an update step writes theta.

    Normally the variable itself (each `sub` an `assign_sub`, as Keras
    does). With `moment_dtype` wider than the variable's dtype, a copy of
    theta in that dtype that collects every change and is cast back once.
    """

    def __init__(self, optimizer, variable, dtype):
        self.optimizer, self.variable, self.dtype = optimizer, variable, dtype
        self.mixed = dtype != keras.backend.standardize_dtype(variable.dtype)
        self.value = ops.cast(variable, dtype) if self.mixed else variable

    def sub(self, delta):
        if self.mixed:
            self.value = ops.subtract(self.value, delta)
        else:
            self.optimizer.assign_sub(self.variable, delta)

    def finish(self):
        if self.mixed:
            self.optimizer.assign(
                self.variable, ops.cast(self.value, self.variable.dtype)
            )


class _AverageSwap:
    """Swaps averaged weights in on enter and the trained ones back on exit."""

    def __init__(self, optimizer, var_list):
        self.optimizer = optimizer
        self.variables = (optimizer._trainable_variables if var_list is None
                          else list(var_list))

    def __enter__(self):
        averages = self.optimizer.average_weights(self.variables)
        self.saved = [ops.copy(ops.convert_to_tensor(v))
                      for v in self.variables]
        for variable, value in zip(self.variables, averages):
            variable.assign(value)
        return self.variables

    def __exit__(self, *exc):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)
        return False


def _serialize_beta(beta):
    if isinstance(beta, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(beta)
    return beta  # a float, or a plain callable (not JSON, as in Keras)


def _all_finite(grads):
    """A scalar bool tensor: no gradient holds a NaN or an Inf."""
    flags = []
    for grad in grads:
        if grad is None:
            continue
        # tf.IndexedSlices: its values (torch tensors have a .values too).
        values = (grad.values if type(grad).__name__ == "IndexedSlices"
                  else grad)
        flags.append(ops.all(ops.isfinite(values)))
    if not flags:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(flags))


def _fast_path_module():
    """The fast-path module of the current backend, or None."""
    if keras.backend.backend() == "torch":
        from keras_adam_plus.backends import torch_fused

        return torch_fused
    return None


def _unpickle(cls, config, state):
    optimizer = cls.from_config(config)
    optimizer._pending_state = state
    return optimizer
