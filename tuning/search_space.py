"""The one declaration of AdamPlus's hyperparameters and their priors.

learning_rate and epsilon are log-uniform. beta_1 and beta_2 are sampled so
that 1 - beta is log-uniform: keras-tuner's samplings cannot express that on
beta itself ("reverse_log" is log-uniform in max + min - beta), so the
keras-tuner hyperparameters are named `one_minus_beta_1` and
`one_minus_beta_2` and `SearchSpace.optimizer_kwargs` turns them back into
`beta_1` and `beta_2`. Defaults are the paper's (Algorithm 1), so a trial with
default values is Adam as published.

Two more are layer-wise (`LAYERWISE`): `layer_decay`, the factor per layer
of depth of `keras_adam_plus.layer_decay_groups` (uniform in [0.5, 1]; 1 is
one learning rate for every layer), and `head_multiplier`, the learning-rate
multiplier of the last layer with variables (a fine-tuned model's new head;
log-uniform in [0.1, 10]). They depend on the model: `optimizer_kwargs(values,
model)` turns them into AdamPlus's `variable_groups`; without a model they
stay under their names (trial tables show them so).
"""

import dataclasses
import math
import numbers

TUNABLE = ("learning_rate", "beta_1", "beta_2", "epsilon")
# The layer-wise hyperparameters and their defaults: one learning rate.
LAYERWISE = {"layer_decay": 1.0, "head_multiplier": 1.0}
# Every name `--tune` takes: the default search is TUNABLE's four.
NAMES = (*TUNABLE, *LAYERWISE)
PAPER_DEFAULTS = {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999,
                  "epsilon": 1e-8}
DEFAULT_RANGES = {
    "learning_rate": (1e-5, 1e-1),
    "beta_1": (0.0, 0.99),  # 1 - beta_1 in [0.01, 1]
    "beta_2": (0.9, 0.9999),  # 1 - beta_2 in [1e-4, 0.1]
    "epsilon": (1e-10, 1e-3),
    "layer_decay": (0.5, 1.0),
    "head_multiplier": (0.1, 10.0),
}
MODE_HPS = ("amsgrad", "epsilon_mode", "weight_decay_mode", "weight_decay")
# AdamPlus's own defaults of its modes: a trial is "the paper default" only
# if every argument it was given (tuned or fixed) is at its paper value.
MODE_DEFAULTS = {"amsgrad": False, "epsilon_mode": "paper",
                 "weight_decay": None}
# Learning-rate schedules a benchmark may train with, as best.json holds
# them: Keras's serialized form, which `AdamPlus.from_config` reads.
SCHEDULES = {
    "inverse_sqrt": {"module": "keras_adam_plus.schedules",
                     "class_name": "InverseSqrtDecay",
                     "registered_name": "keras_adam_plus>InverseSqrtDecay",
                     "argument": "initial_learning_rate"},
}


@dataclasses.dataclass
class SearchSpace:
    """Which AdamPlus hyperparameters are tuned, over which ranges.

    Args:
        tune: Names (of `NAMES`: `TUNABLE` and `LAYERWISE`) that are
            searched; the others are fixed at `fixed` or the paper's
            defaults (one learning rate for every layer). Defaults to
            `TUNABLE` (learning_rate, beta_1, beta_2, epsilon).
        ranges: Overrides of `DEFAULT_RANGES`, name -> (low, high) in the
            hyperparameter's own units (beta, not 1 - beta). Defaults to
            `{}` (`DEFAULT_RANGES` for every name).
        fixed: AdamPlus keyword arguments (or `layer_decay`,
            `head_multiplier`) fixed for every trial. Defaults to `{}`.
        modes: Whether to also search `amsgrad`, `epsilon_mode` and weight
            decay (a mode, then, conditionally, its coefficient). Defaults
            to `False`.
        grid_steps: For GridSearch, the log-spaced steps per decade count:
            each tuned hyperparameter takes values a factor `10**(1/n)`
            apart; 0 declares continuous ranges (the other tuners), and a
            grid search (`sweep`, the command line) takes 0 as 1
            (`for_tuner`). Defaults to `0`.
    """

    tune: tuple = TUNABLE
    ranges: dict = dataclasses.field(default_factory=dict)
    fixed: dict = dataclasses.field(default_factory=dict)
    modes: bool = False
    grid_steps: int = 0

    def __post_init__(self):
        unknown = set(self.tune) - set(NAMES)
        if unknown:
            raise ValueError(
                f"Argument `tune` must name only {', '.join(NAMES)}. "
                f"Received: tune={list(self.tune)!r}"
            )
        if not isinstance(self.grid_steps, numbers.Integral) or isinstance(
                self.grid_steps, bool) or self.grid_steps < 0:
            raise ValueError("Argument `grid_steps` must be an integer >= 0."
                             f" Received: grid_steps={self.grid_steps!r}")
        self.grid_steps = int(self.grid_steps)  # NumPy integers too
        self.modes = bool(self.modes)
        # One order (NAMES') whatever the order given: the same space
        # declares, draws and compares the same way.
        self.tune = tuple(name for name in NAMES if name in self.tune)
        for name, (low, high) in self.ranges.items():
            if name not in NAMES or not low < high:
                raise ValueError(
                    "Argument `ranges` must map names of "
                    f"{', '.join(NAMES)} to (low, high) with low < high. "
                    f"Received: ranges={self.ranges!r}"
                )

    def for_tuner(self, tuner):
        """This space as `tuner` searches it: a grid search needs steps,
        so `grid_steps` 0 becomes 1 (one point per decade) for `"grid"`;
        the one rule for `sweep()` and the command line."""
        if tuner == "grid" and not self.grid_steps:
            return dataclasses.replace(self, grid_steps=1)
        return self

    def range(self, name):
        return self.ranges.get(name, DEFAULT_RANGES[name])

    def declare(self, hp):
        """Declares the hyperparameters on `hp` and returns their values.

        The returned dict holds keras-tuner's names (`one_minus_beta_1`...).
        """
        values = {}
        for name in self.tune:
            low, high = self.range(name)
            default = self.fixed.get(
                name, {**PAPER_DEFAULTS, **LAYERWISE}[name])
            if name == "layer_decay":  # narrow: uniform, a linear grid
                step = ((high - low) / (2 * self.grid_steps)
                        if self.grid_steps else None)
                values[name] = hp.Float(
                    name, low, high, step=step,
                    default=_snap_linear(default, low, step))
                continue
            if name.startswith("beta"):
                hp_name = f"one_minus_{name}"
                low, high, default = 1 - high, 1 - low, 1 - default
            else:
                hp_name = name
            step = 10 ** (1 / self.grid_steps) if self.grid_steps else None
            values[hp_name] = hp.Float(
                hp_name, low, high, sampling="log", step=step,
                default=_snap(default, low, step),
            )
        if self.modes:
            values["amsgrad"] = hp.Boolean("amsgrad", default=False)
            values["epsilon_mode"] = hp.Choice(
                "epsilon_mode", ["paper", "hat"], default="paper"
            )
            mode = hp.Choice("weight_decay_mode",
                             ["none", "decoupled", "l2"], default="none")
            values["weight_decay_mode"] = mode
            with hp.conditional_scope("weight_decay_mode",
                                      ["decoupled", "l2"]):
                if mode != "none":
                    values["weight_decay"] = hp.Float(
                        "weight_decay", 1e-6, 1e-1, sampling="log",
                        default=1e-4,
                    )
        return values

    def optimizer_kwargs(self, values, model=None):
        """AdamPlus keyword arguments from keras-tuner values.

        With `model`, the layer-wise values become `variable_groups`
        (`with_variable_groups`); without one, they are kept under their
        names (`layer_decay`, `head_multiplier`), which AdamPlus does not
        take: the form trial tables show.
        """
        kwargs = dict(PAPER_DEFAULTS)
        kwargs.update(self.fixed)
        for hp_name, value in values.items():
            if hp_name.startswith("one_minus_"):
                # round() undoes 1 - (1 - beta)'s last-bit error.
                kwargs[hp_name[len("one_minus_"):]] = round(1 - value, 15)
            elif hp_name == "weight_decay_mode":
                if value == "none":
                    kwargs.pop("weight_decay", None)
                else:
                    kwargs["weight_decay_mode"] = value
            elif hp_name in NAMES or hp_name in MODE_HPS:
                kwargs[hp_name] = value
        return kwargs if model is None else with_variable_groups(kwargs,
                                                                 model)


def with_variable_groups(kwargs, model):
    """`kwargs` with `layer_decay` and `head_multiplier` turned into
    AdamPlus's `variable_groups` for `model`.

    The rules are `keras_adam_plus.layer_decay_groups(model, layer_decay)`
    with the head's (the last layer with variables) multiplier times
    `head_multiplier`, after any rules `kwargs` holds (first match wins).
    At their defaults (1: one learning rate) no rule is added, so the
    optimizer is plain AdamPlus.
    """
    kwargs = dict(kwargs)
    layerwise = {k: kwargs.pop(k) for k in LAYERWISE if k in kwargs}
    if all(layerwise.get(k, v) == v for k, v in LAYERWISE.items()):
        return kwargs
    from keras_adam_plus import layer_decay_groups

    rules = layer_decay_groups(model, layerwise.get("layer_decay", 1.0))
    head = rules[0]  # deepest first: the last layer's rule
    rules[0] = dict(head, learning_rate_multiplier=float(
        head["learning_rate_multiplier"]
        * layerwise.get("head_multiplier", 1.0)))
    return {**kwargs, "variable_groups": [
        *(kwargs.get("variable_groups") or ()), *rules]}


def is_paper_default(kwargs):
    """Whether AdamPlus `kwargs` are the paper's Algorithm 1 throughout:
    the four hyperparameters at `PAPER_DEFAULTS`, one learning rate for
    every layer (`LAYERWISE` at 1) and every mode (amsgrad, epsilon mode,
    weight decay, any other argument given) at its default."""
    defaults = {**PAPER_DEFAULTS, **LAYERWISE}
    for key in set(kwargs) | set(PAPER_DEFAULTS) | set(MODE_DEFAULTS):
        value = kwargs.get(key, MODE_DEFAULTS.get(key))
        if key in defaults:
            if not (isinstance(value, (int, float)) and math.isclose(
                    value, defaults[key], rel_tol=1e-9)):
                return False
        elif key == "weight_decay_mode":
            continue  # without a weight decay, no mode applies
        elif key not in MODE_DEFAULTS or value != MODE_DEFAULTS[key]:
            return False
    return True


def optimizer_config(kwargs, schedule=None, variable_groups=None):
    """What best.json holds: AdamPlus arguments that rebuild a trial with
    `AdamPlus.from_config(config)`.

    `kwargs` are a trial's AdamPlus arguments with the learning rate as a
    number (alpha); with a `schedule` (a key of `SCHEDULES`), the learning
    rate is the schedule in Keras's serialized form, as `get_config` writes
    it. Without one, `AdamPlus(**config)` works too. Layer-wise values
    (`layer_decay`, `head_multiplier`) are replaced by the
    `variable_groups` the trial trained with (`with_variable_groups` of its
    model).
    """
    config = {k: v for k, v in kwargs.items() if k not in LAYERWISE}
    if variable_groups:
        config["variable_groups"] = variable_groups
    if schedule is not None:
        spec = SCHEDULES[schedule]
        config["learning_rate"] = {
            "module": spec["module"], "class_name": spec["class_name"],
            "config": {spec["argument"]: kwargs["learning_rate"]},
            "registered_name": spec["registered_name"]}
    return config


def modes_text(kwargs, schedule=None):
    """The modes of AdamPlus `kwargs` for people: every argument given that
    is not a number (amsgrad, epsilon_mode, weight_decay_mode, tuned or
    fixed) and the learning-rate schedule, if any."""
    parts = [f"{k}={v}" for k, v in kwargs.items()
             if v is not None and not isinstance(v, (int, float))
             or isinstance(v, bool)]
    if schedule is not None:
        parts.append(f"schedule={schedule}")
    return " ".join(parts)


def format_value(name, value):
    """`value` of AdamPlus argument `name`, for people.

    A beta shows three significant digits of `1 - beta` (0.9996 stays
    0.9996, never 1); other floats three significant digits.
    """
    if not isinstance(value, float):
        return str(value)
    if name.startswith("beta") and 0 <= value < 1:
        decimals = math.floor(-math.log10(1 - value)) + 3
        return f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _snap_linear(default, low, step):
    """With a linear grid step, the nearest grid value to `default`."""
    if not step:
        return default
    return low + round((default - low) / step) * step


def _snap(default, low, step):
    """With a grid step, the nearest grid value to `default`."""
    if not step:
        return default
    k = round(math.log(default / low) / math.log(step))
    return low * step**k
