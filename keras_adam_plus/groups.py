"""Per-variable hyperparameters: rules matched on a variable's path.

`AdamPlus(variable_groups=[...])` takes a list of rules, each a dict with a
regular expression under `"match"` (searched in the variable's path, then
its name) and the settings its variables take instead of the optimizer's:

    learning_rate_multiplier  alpha of the group = the optimizer's (or its
                              schedule's value) times this, > 0
    weight_decay              lambda, >= 0 (0: no decay in the group)
    weight_decay_mode         "decoupled", "decoupled_unscaled" or "l2"
    beta_1, beta_2            in [0, 1) (floats; not with scheduled betas)
    epsilon                   > 0
    state_format              how the group's m, v are stored: "native" or
                              "8bit" or "4bit" (`lowbit.FORMATS`)
    state_format_min_size     with a quantized format, the size under
                              which a variable keeps the native format
                              (default: the optimizer's)
    name                      how `describe()` shows the group (optional)

The first rule that matches a variable wins; variables no rule matches
keep the optimizer's own arguments (the default group). At build, a rule
that matches no variable is an error naming it (a typo must not leave a
backbone at full learning rate). `weight_decay_exclude` and Keras's
`exclude_from_weight_decay` still apply on top of the groups.
`layer_decay_groups` makes the rules of layer-wise learning-rate decay.
"""

import collections
import re

from keras_adam_plus import lowbit, validation

KEYS = ("match", "name", "learning_rate_multiplier", "weight_decay",
        "weight_decay_mode", "beta_1", "beta_2", "epsilon", "state_format",
        "state_format_min_size")

# One group's settings: the rule's hyperparameters (`rule.Hyper`), its
# learning-rate multiplier and weight decay (a float, a schedule or None),
# its name and the `storage.Format` of its state (None: the plan's).
Setting = collections.namedtuple(
    "Setting", ["hyper", "lr_multiplier", "weight_decay", "name",
                "state_format"], defaults=(None,))


def check(value, betas_scheduled, state_format="native"):
    """Validates `variable_groups`; returns a list of plain dicts.

    Each error is one line naming the rule (`variable_groups[i]`), the key
    and the value received. `state_format` is the optimizer's (a rule's
    `state_format_min_size` needs a quantized format in its group).
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(
            value, "__iter__"):
        raise TypeError(
            "Argument `variable_groups` must be a list of dicts. "
            f"Received: variable_groups={value!r}")
    result = []
    for i, rule in enumerate(value):
        where = f"variable_groups[{i}]"
        if not isinstance(rule, dict):
            raise TypeError(f"Argument `{where}` must be a dict. Received: "
                            f"{where}={rule!r}")
        unknown = sorted(set(rule) - set(KEYS), key=str)
        if unknown:
            raise ValueError(
                f"Argument `{where}` has unknown key {unknown[0]!r}; the "
                f"keys are {', '.join(KEYS)}. Received: {where}={rule!r}")
        if "match" not in rule:
            raise ValueError(f"Argument `{where}` needs a \"match\" regular "
                             f"expression. Received: {where}={rule!r}")
        if not isinstance(rule["match"], str):
            raise TypeError(
                f"Argument `{where}['match']` must be a string (a regular "
                f"expression). Received: {where}['match']={rule['match']!r}")
        try:
            re.compile(rule["match"])
        except re.error as err:
            raise ValueError(
                f"Argument `{where}['match']` holds an invalid regular "
                f"expression {rule['match']!r} ({err}). Received: "
                f"{where}['match']={rule['match']!r}") from None
        checked = {"match": rule["match"]}
        if "name" in rule:
            if not isinstance(rule["name"], str) or not rule["name"]:
                raise TypeError(
                    f"Argument `{where}['name']` must be a non-empty string."
                    f" Received: {where}['name']={rule['name']!r}")
            checked["name"] = rule["name"]
        for key, check_one in _CHECKS.items():
            if key in rule:
                checked[key] = check_one(f"{where}['{key}']", rule[key])
        if betas_scheduled and ({"beta_1", "beta_2"} & set(rule)):
            raise ValueError(
                f"Argument `{where}` sets a beta, but the optimizer's betas "
                "are scheduled (their bias correction is shared). Received: "
                f"{where}={rule!r}")
        if "state_format_min_size" in rule and checked.get(
                "state_format", state_format) == "native":
            raise ValueError(
                f"Argument `{where}['state_format_min_size']` needs a "
                "quantized `state_format` in its group, which keeps "
                f"\"native\" state. Received: {where}={rule!r}")
        result.append(checked)
    return result


_CHECKS = {
    "learning_rate_multiplier": lambda n, v: validation.check_float(
        n, v, low=0.0, low_inclusive=False),
    "weight_decay": lambda n, v: validation.check_float(n, v, low=0.0),
    "weight_decay_mode": lambda n, v: validation.check_choice(
        n, v, validation.WEIGHT_DECAY_MODES),
    "beta_1": lambda n, v: validation.check_float(
        n, v, low=0.0, high=1.0, high_inclusive=False),
    "beta_2": lambda n, v: validation.check_float(
        n, v, low=0.0, high=1.0, high_inclusive=False),
    "epsilon": lambda n, v: validation.check_float(
        n, v, low=0.0, low_inclusive=False),
    "state_format": lambda n, v: validation.check_choice(
        n, v, validation.STATE_FORMATS),
    "state_format_min_size": lambda n, v: validation.check_int(n, v, 0),
}


def assign(default, rules, variables, built, min_size=4096):
    """`(settings, setting_of)`: the groups' settings and each variable's.

    `default` is the default group's `Setting` (settings[0]); rule i is
    settings[i + 1]. A rule with a `state_format` (or a min size) has a
    format of its own, `min_size` (the optimizer's) unless it sets one.
    When `built`, a rule that matches no variable raises.
    """
    settings = [default]
    for i, rule in enumerate(rules):
        hyper = default.hyper._replace(**{
            k: rule[k] for k in ("beta_1", "beta_2", "epsilon",
                                 "weight_decay_mode") if k in rule})
        state_format = default.state_format
        if {"state_format", "state_format_min_size"} & set(rule):
            state_format = lowbit.format_of(
                rule.get("state_format", default.state_format.name),
                rule.get("state_format_min_size", min_size))
        settings.append(Setting(
            hyper, rule.get("learning_rate_multiplier", 1.0),
            rule.get("weight_decay", default.weight_decay),
            rule.get("name", f"variable_groups[{i}]"), state_format))
    setting_of = []
    taken = set()
    for variable in variables:
        k = next((i + 1 for i, rule in enumerate(rules)
                  if validation.matches([rule["match"]], variable)), 0)
        setting_of.append(k)
        taken.add(k)
    if built:
        for i, rule in enumerate(rules):
            if i + 1 not in taken:
                raise ValueError(
                    f"Argument `variable_groups[{i}]` matches no variable: "
                    f"no path or name contains {rule['match']!r} (first "
                    "match wins, so an earlier rule may have taken them). "
                    "Variables: " + ", ".join(_label(v) for v in variables))
    return tuple(settings), tuple(setting_of)


def describe(settings, setting_of, variables):
    """A table: each group, its settings and the variables it took; then
    a line per quantized state format (one for all groups when they share
    the optimizer's, else one per group, after its name)."""
    lines, states = [], []
    mixed = any(s.state_format is not settings[0].state_format
                for s in settings)
    for k, setting in enumerate(settings):
        taken = [v for v, i in zip(variables, setting_of) if i == k]
        h, fmt = setting.hyper, setting.state_format
        lines.append(
            f"{setting.name}: lr x{setting.lr_multiplier:g}, weight_decay="
            f"{_show(setting.weight_decay)} ({h.weight_decay_mode}), "
            f"beta_1={_show(h.beta_1)}, beta_2={_show(h.beta_2)}, "
            f"epsilon={h.epsilon:g}"
            + (f", state_format={fmt.name}" if mixed else "")
            + f": {_count(len(taken), 'variable')}")
        lines.extend(f"    {_label(v)}" for v in taken)
        state = fmt.describe(taken if mixed else variables)
        if state is not None and (mixed or not k):
            states.append(f"{setting.name}: {state}" if mixed else state)
    return "\n".join(lines + states)


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _show(value):
    return f"{value:g}" if isinstance(value, float) else (
        "None" if value is None else type(value).__name__)


def _label(variable):
    return getattr(variable, "path", None) or variable.name


def layer_decay_groups(layers, decay=0.75, weight_decay_1d=None):
    """Rules for layer-wise learning-rate decay (BEiT, ELECTRA; timm's
    `param_groups_layer_decay`): layer i of n takes `decay ** (n - 1 - i)`.

    Args:
        layers: A Keras model, or a list of layers in depth order. Of a
            model, the layers that own variables, in `model.layers` order,
            nested models flattened in place: for a Sequential or a
            functional model that is input to output, so the embedding
            (first) is at depth 0 and the head (last) at the top, with a
            multiplier of 1. A model's own weights (`add_weight` in a
            subclassed model: a position embedding, a class token) share
            the depth of its first layer with variables.
        decay: The factor per layer of depth, in (0, 1]. Defaults to
            `0.75`.
        weight_decay_1d: If set (e.g. `0.0`), 1-D variables (biases,
            normalization scales) get this weight decay, as timm does.
            Defaults to `None` (the optimizer's).

    Returns:
        A list of rules for `AdamPlus(variable_groups=...)`, one per layer
        (and per layer a rule for its 1-D variables when
        `weight_decay_1d` is set), deepest first. Of a model, each rule
        matches its variables' paths with or without the model's name in
        front: Keras names a Sequential's variables "net/dense/kernel"
        when it is built and "dense/kernel" when `load_model` rebuilds it
        (or the reverse), and the rules must hold for both.
    """
    decay = validation.check_float("decay", decay, low=0.0, high=1.0,
                                   low_inclusive=False)
    if weight_decay_1d is not None:
        weight_decay_1d = validation.check_float(
            "weight_decay_1d", weight_decay_1d, low=0.0)
    model = hasattr(layers, "layers")
    flat = _owning(layers if model else None,
                   layers.layers if model else layers)
    if not flat:
        raise ValueError("Argument `layers` has no layer with variables. "
                         f"Received: layers={layers!r}")
    prefix = f"{layers.name}/" if model else None

    def match(variables):
        paths = [_label(v) for v in variables]
        if prefix is None:
            return "^(" + "|".join(map(re.escape, paths)) + ")$"
        paths = [p[len(prefix):] if p.startswith(prefix) else p
                 for p in paths]
        return (f"^({re.escape(prefix)})?("
                + "|".join(map(re.escape, paths)) + ")$")

    rules = []
    count = len(flat)
    for depth, (name, weights) in reversed(list(enumerate(flat))):
        multiplier = float(decay ** (count - 1 - depth))
        if weight_decay_1d is not None:
            flat_variables = [v for v in weights if len(v.shape) <= 1]
            if flat_variables:
                rules.append({
                    "match": match(flat_variables),
                    "name": f"{name} (1-D, depth {depth})",
                    "learning_rate_multiplier": multiplier,
                    "weight_decay": weight_decay_1d})
        rules.append({"match": match(weights),
                      "name": f"{name} (depth {depth})",
                      "learning_rate_multiplier": multiplier})
    return rules


def _owning(model, layers):
    """`(name, trainable weights)` per layer with variables, in depth
    order, nested models flattened in place. A model's own weights (made
    with `add_weight`, e.g. a position embedding) join its first entry,
    the depth timm gives `pos_embed`; they went to the default group,
    at the head's rate (found by review)."""
    result = []
    for layer in layers:
        inner = getattr(layer, "layers", None)
        if inner:
            result.extend(_owning(layer, inner))
        elif layer.trainable_weights:
            result.append((layer.name, list(layer.trainable_weights)))
    if model is not None:
        taken = {id(w) for _, weights in result for w in weights}
        own = [w for w in model.trainable_weights if id(w) not in taken]
        if own and result:
            result[0] = (result[0][0], own + result[0][1])
        elif own:
            result = [(model.name, own)]
    return result
