"""Argument checks for AdamPlus, run once at construction.

Every check returns the value converted to a plain Python type (so that
configs stay JSON-serializable) or raises a `TypeError` (wrong kind of
value) or `ValueError` (right kind, out of range) whose message names the
argument and the value received, in Keras's shape:
"Argument `beta_2` must be in [0, 1). Received: beta_2=1.5".
"""

import inspect
import itertools
import math
import numbers
import re

import numpy as np


def _received(name, value):
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"<int of {value.bit_length()} bits>"
    if len(text) > 80:
        text = text[:40] + "..." + text[-20:]
    return f"Received: {name}={text}"


def _is_real_number(value):
    # bool is an int subclass; True as a learning rate is a bug, not a 1.
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.number)
    return isinstance(value, numbers.Real)


def check_float(name, value, low=None, high=None, low_inclusive=True,
                high_inclusive=True, optional=False):
    """Returns `value` as a finite Python float in the given interval.

    Args:
        name: The argument's name, used in the error message.
        value: What the user passed. Ints and NumPy scalars are accepted.
        low: Lower bound, or `None` for no lower bound.
        high: Upper bound, or `None` for no upper bound.
        low_inclusive: Whether `low` itself is allowed.
        high_inclusive: Whether `high` itself is allowed.
        optional: Whether `None` is allowed (and returned as is).

    Returns:
        The value as a `float` (or `None` when optional).
    """
    if value is None and optional:
        return None
    if not _is_real_number(value):
        kind = "a float or None" if optional else "a float"
        raise TypeError(
            f"Argument `{name}` must be {kind}. {_received(name, value)} "
            f"(of type {type(value).__name__})"
        )
    try:
        result = float(value)
    except OverflowError:  # an int beyond float's range
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(
            f"Argument `{name}` must be finite. {_received(name, value)}"
        )
    too_low = low is not None and (
        result < low or (result == low and not low_inclusive)
    )
    too_high = high is not None and (
        result > high or (result == high and not high_inclusive)
    )
    if too_low or too_high:
        raise ValueError(
            f"Argument `{name}` must be "
            f"{_interval(low, high, low_inclusive, high_inclusive)}. "
            f"{_received(name, value)}"
        )
    return result


def _interval(low, high, low_inclusive, high_inclusive):
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low:g}"
    if low is None:
        return f"{'<=' if high_inclusive else '<'} {high:g}"
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    return f"in {left}{low:g}, {high:g}{right}"


def check_int(name, value, low, optional=False):
    """Returns `value` as a Python int >= `low` (or `None` when optional)."""
    if value is None and optional:
        return None
    is_int = isinstance(value, (numbers.Integral, np.integer)) and not (
        isinstance(value, (bool, np.bool_))
    )
    if not is_int:
        kind = "an integer or None" if optional else "an integer"
        raise TypeError(
            f"Argument `{name}` must be {kind}. {_received(name, value)} "
            f"(of type {type(value).__name__})"
        )
    if value < low:
        raise ValueError(
            f"Argument `{name}` must be an integer >= {low}. "
            f"{_received(name, value)}"
        )
    return int(value)


def check_bool(name, value):
    """Returns `value` as a Python bool; 0/1 or strings are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Argument `{name}` must be a bool (True or False). "
            f"{_received(name, value)} (of type {type(value).__name__})"
        )
    return bool(value)


def check_choice(name, value, choices, optional=False):
    """Returns `value` if it is one of `choices` (a tuple of strings);
    `optional`: None is a choice too (the caller's default), named first
    in the error."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join((*("None",) * optional,
                             *(f'"{c}"' for c in choices)))
        raise ValueError(
            f"Argument `{name}` must be one of {options}. "
            f"{_received(name, value)}"
        )
    return value


def check_patterns(name, value):
    """Returns a list of regex strings from `None`, a string or a sequence.

    Each pattern must compile with `re`; the error names the bad one.
    """
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(p, str) for p in value
    ):
        raise TypeError(
            f"Argument `{name}` must be None, a string or a list of strings "
            f"(regular expressions). {_received(name, value)}"
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"Argument `{name}` holds an invalid regular expression "
                f"{pattern!r} ({err}). {_received(name, value)}"
            ) from None
    return list(value)


def is_schedule(value):
    """Whether `value` is a `LearningRateSchedule` or a callable of a step."""
    from keras.optimizers.schedules import LearningRateSchedule

    return isinstance(value, LearningRateSchedule) or (
        callable(value) and not _is_real_number(value)
    )


def _accepts(function, count):
    """Whether `function` can be called with `count` positional args."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature
        return True
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _check_callable(name, value, count):
    """Refuses a plain callable that cannot take `count` arguments."""
    from keras.optimizers.schedules import LearningRateSchedule

    if isinstance(value, LearningRateSchedule) or _accepts(value, count):
        return value
    if count == 0:
        want = ("a callable taking no arguments (Keras calls it with none; "
                "`beta_1`, `beta_2` and `weight_decay` callables take the "
                "step)")
    else:
        want = ("a callable taking the step (one argument; `learning_rate` "
                "callables take none)")
    try:
        signature = str(inspect.signature(value))
    except (TypeError, ValueError):
        signature = "?"
    raise TypeError(
        f"Argument `{name}` must be {want}. {_received(name, value)} "
        f"with signature {signature}"
    )


def check_learning_rate(value):
    """Returns a float learning rate, or the schedule/callable unchanged.

    A plain callable must take no arguments (Keras calls it with none).
    """
    if is_schedule(value):
        return _check_callable("learning_rate", value, 0)
    if not _is_real_number(value):
        raise TypeError(
            "Argument `learning_rate` must be a float, a "
            "`keras.optimizers.schedules.LearningRateSchedule` or a callable. "
            f"{_received('learning_rate', value)} "
            f"(of type {type(value).__name__})"
        )
    return check_float("learning_rate", value, low=0.0)


def check_beta(name, value):
    """Returns a float beta in [0, 1), or the schedule/callable unchanged.

    A plain callable must take the step (one argument).
    """
    if is_schedule(value):
        return _check_callable(name, value, 1)
    return check_float(name, value, low=0.0, high=1.0, high_inclusive=False)


def check_weight_decay(value):
    """Returns None, a float >= 0, or the schedule/callable unchanged.

    A plain callable must take the step (one argument).
    """
    if is_schedule(value):
        return _check_callable("weight_decay", value, 1)
    return check_float("weight_decay", value, low=0.0, optional=True)


def matches(patterns, variable):
    """Whether a variable's path or name matches one of `patterns`."""
    labels = (getattr(variable, "path", None) or "", variable.name)
    return any(re.search(p, label) for p in patterns for label in labels)


def check_name(value):
    """Returns the optimizer name: `None` or a non-empty string."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise TypeError(
        "Argument `name` must be a non-empty string or None. "
        f"{_received('name', value)}"
    )


EPSILON_MODES = ("paper", "hat")
MOMENT_DTYPES = ("float32",)
STATE_FORMATS = ("native", "8bit", "4bit")
WEIGHT_DECAY_MODES = ("decoupled", "decoupled_unscaled", "l2")


# AdamPlus's own arguments (the others are keras.optimizers.Optimizer's).
OWN = ("beta_1", "beta_2", "epsilon", "epsilon_mode", "amsgrad",
       "bias_correction", "adamax", "nesterov", "skip_nonfinite",
       "lazy_sparse", "group_small_variables", "moment_dtype",
       "average_decay", "weight_decay_mode", "weight_decay_exclude",
       "variable_groups", "state_format", "state_format_min_size")


def arguments(learning_rate, beta_1, beta_2, epsilon, epsilon_mode, amsgrad,
              bias_correction, adamax, nesterov, skip_nonfinite,
              average_decay, lazy_sparse, group_small_variables,
              moment_dtype, weight_decay, weight_decay_mode,
              weight_decay_exclude, variable_groups, clipnorm, clipvalue,
              global_clipnorm,
              use_ema, ema_momentum, ema_overwrite_frequency,
              loss_scale_factor, gradient_accumulation_steps, name,
              state_format="native", state_format_min_size=4096):
    """Checks every argument of `AdamPlus`; returns `(base, own)`.

    `base`: the keyword arguments of `keras.optimizers.Optimizer`; `own`:
    AdamPlus's attributes, each named as its argument. Raises on the first
    bad value, naming it, or on modes that cannot combine.
    """
    accumulation = check_int("gradient_accumulation_steps",
                             gradient_accumulation_steps, 1, optional=True)
    positive = dict(low=0.0, low_inclusive=False, optional=True)
    base = dict(
        learning_rate=check_learning_rate(learning_rate),
        weight_decay=check_weight_decay(weight_decay),
        clipnorm=check_float("clipnorm", clipnorm, **positive),
        clipvalue=check_float("clipvalue", clipvalue, **positive),
        global_clipnorm=check_float("global_clipnorm", global_clipnorm,
                                    **positive),
        use_ema=check_bool("use_ema", use_ema),
        ema_momentum=check_float("ema_momentum", ema_momentum, low=0.0,
                                 high=1.0),
        ema_overwrite_frequency=check_int(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1,
            optional=True),
        loss_scale_factor=check_float("loss_scale_factor",
                                      loss_scale_factor, **positive),
        # Keras wants None or >= 2; 1 means no accumulation.
        gradient_accumulation_steps=(
            accumulation if accumulation and accumulation > 1 else None),
        name=check_name(name),
    )
    own = dict(
        beta_1=check_beta("beta_1", beta_1),
        beta_2=check_beta("beta_2", beta_2),
        epsilon=check_float("epsilon", epsilon, low=0.0,
                            low_inclusive=False),
        epsilon_mode=check_choice("epsilon_mode", epsilon_mode,
                                  EPSILON_MODES),
        amsgrad=check_bool("amsgrad", amsgrad),
        bias_correction=check_bool("bias_correction", bias_correction),
        adamax=check_bool("adamax", adamax),
        nesterov=check_bool("nesterov", nesterov),
        skip_nonfinite=check_bool("skip_nonfinite", skip_nonfinite),
        lazy_sparse=check_bool("lazy_sparse", lazy_sparse),
        group_small_variables=check_bool("group_small_variables",
                                         group_small_variables),
        moment_dtype=None if moment_dtype is None else check_choice(
            "moment_dtype", moment_dtype, MOMENT_DTYPES, optional=True),
        average_decay=check_float("average_decay", average_decay, low=0.0,
                                  high=1.0, high_inclusive=False,
                                  optional=True),
        weight_decay_mode=check_choice("weight_decay_mode",
                                       weight_decay_mode, WEIGHT_DECAY_MODES),
        weight_decay_exclude=check_patterns("weight_decay_exclude",
                                            weight_decay_exclude),
        state_format=check_choice("state_format", state_format,
                                  STATE_FORMATS),
        state_format_min_size=check_int("state_format_min_size",
                                        state_format_min_size, 0),
    )
    scheduled = not all(isinstance(own[b], float)
                        for b in ("beta_1", "beta_2"))
    if own["lazy_sparse"] and (own["adamax"] or own["nesterov"] or scheduled
                               or own["moment_dtype"] is not None):
        raise ValueError(
            "Argument `lazy_sparse` supports the Adam and AMSGrad steps "
            "with constant betas, not adamax, nesterov, scheduled betas or "
            "moment_dtype. Received: lazy_sparse=True, "
            f"adamax={own['adamax']}, nesterov={own['nesterov']}, "
            f"beta_1={own['beta_1']!r}, beta_2={own['beta_2']!r}, "
            f"moment_dtype={own['moment_dtype']!r}")
    from keras_adam_plus import groups

    own["variable_groups"] = groups.check(variable_groups, scheduled,
                                          own["state_format"])
    # The optimizer's format, then each rule's: any quantized one refuses.
    formats = [("state_format", own["state_format"])] + [
        (f"variable_groups[{i}]['state_format']", rule["state_format"])
        for i, rule in enumerate(own["variable_groups"])
        if "state_format" in rule]
    for (name, value), (flag, why) in itertools.product(formats, (
            ("lazy_sparse", "sparse rows would need their blocks decoded "
             "and encoded whole"),
            ("group_small_variables", "flat groups would share blocks "
             "across variables"))):
        if value != "native" and own[flag]:
            raise ValueError(
                f"Argument `{name}` {value!r} cannot combine with "
                f"`{flag}=True` yet ({why}). Received: {name}={value!r}, "
                f"{flag}=True")
    if own["adamax"] and own["amsgrad"]:
        raise ValueError(
            "Arguments `adamax` and `amsgrad` cannot both be True: "
            "AdaMax's u = max(beta_2 * u, |g|) is already a running "
            "maximum. Received: adamax=True, amsgrad=True")
    return base, own
