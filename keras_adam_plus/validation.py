"""Argument checks for AdamPlus, run once at construction.

Every check returns the value converted to a plain Python type (so that
configs stay JSON-serializable) or raises a `TypeError` (wrong kind of
value) or `ValueError` (right kind, out of range) whose message names the
argument and the value received, in Keras's shape:
"Argument `beta_2` must be in [0, 1). Received: beta_2=1.5".
"""

import inspect
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


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices` (a tuple of strings)."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(f'"{c}"' for c in choices)
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


def check_name(value):
    """Returns the optimizer name: `None` or a non-empty string."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise TypeError(
        "Argument `name` must be a non-empty string or None. "
        f"{_received('name', value)}"
    )
