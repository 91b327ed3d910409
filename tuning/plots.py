"""PNG plots of a sweep: score vs each hyperparameter, learning curves.

Every plot has a title, marks the best trial, names configurations in its
legends, and tells series apart by marker and line style as well as by
colour, so that it reads when printed in grey.
"""

import itertools
import math
import warnings

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tuning import rundir  # noqa: E402

AXES = {  # optimizer argument -> (axis label, value shown on a log axis)
    "learning_rate": ("learning rate alpha", lambda v: v),
    "beta_1": ("1 - beta_1", lambda v: 1 - v),
    "beta_2": ("1 - beta_2", lambda v: 1 - v),
    "epsilon": ("epsilon", lambda v: v),
}


MARKERS = ("o", "s", "^", "v", "P", "h")
STYLES = ("-", "--", ":", "-.")


def draw_all(directory, trials, best, default, settings, direction="min"):
    """Writes scores.png, learning_curves.png and default_vs_best.png."""
    objective = settings.get("objective", "val_loss")
    scores(directory / "scores.png", trials, objective, direction, best)
    curves(directory / "learning_curves.png", trials, objective, direction)
    if best:
        default_vs_best(directory / "default_vs_best.png", default, best)


def config_text(trial):
    """A trial's configuration for a legend: the tuned values, short."""
    from tuning.search_space import format_value

    names = {"learning_rate": "lr", "beta_1": "b1", "beta_2": "b2",
             "epsilon": "eps", "weight_decay": "wd"}
    parts = [f"{names.get(k, k)} {format_value(k, v)}"
             for k, v in trial["optimizer"].items()
             if isinstance(v, float) or (v not in (None, False, "paper")
                                         and k != "weight_decay_mode")]
    if trial["optimizer"].get("weight_decay_mode") and trial[
            "optimizer"].get("weight_decay") is not None:
        parts.append(trial["optimizer"]["weight_decay_mode"])
    return ", ".join(parts)


def scores(path, trials, objective, direction="min", best=None):
    """Score against each hyperparameter on log axes, one marker and colour
    per budget (epochs); diverged and failed trials marked x at the worst
    end; the paper's defaults a star, the best trial a ringed diamond."""
    keys = [k for k in AXES
            if len({t["optimizer"].get(k) for t in trials}) > 1]
    keys = keys or ["learning_rate"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.8),
                             squeeze=False)
    good = [t for t in trials if t["score"] is not None]
    failed = [t for t in trials if t["status"] in ("DIVERGED", "FAILED")]
    values = [t["score"] for t in good] or [1.0]
    worst = max(values) * 1.1 if direction == "min" else min(values) * 0.9
    budgets = sorted({t["epochs"] for t in good})
    for ax, key in zip(axes[0], keys):
        label, show = AXES[key]
        for epochs, marker in zip(budgets, itertools.cycle(MARKERS)):
            level = [t for t in good if t["epochs"] == epochs]
            ax.scatter([show(t["optimizer"][key]) for t in level],
                       [t["score"] for t in level], marker=marker,
                       label=f"completed, {epochs} epochs")
        if failed:
            ax.scatter([show(t["optimizer"][key]) for t in failed],
                       [worst] * len(failed), marker="x", color="red",
                       label="diverged / failed")
        for t in good:
            if t.get("is_default"):
                ax.scatter([show(t["optimizer"][key])], [t["score"]],
                           marker="*", s=150, color="orange",
                           edgecolors="black", label="paper default")
        if best is not None:
            ax.scatter([show(best["optimizer"][key])], [best["score"]],
                       marker="D", s=110, facecolors="none",
                       edgecolors="black", linewidths=2,
                       label=f"best: trial {best['trial_id']}")
        with warnings.catch_warnings():
            # One point (a search that has just begun): equal limits,
            # which matplotlib widens itself, warning on stderr.
            warnings.simplefilter("ignore", UserWarning)
            ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if good and min(t["score"] for t in good) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(objective)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{objective} of each trial at its best epoch "
                 f"({'lower' if direction == 'min' else 'higher'} is better)")
    fig.tight_layout()
    rundir.write_figure(fig, path, dpi=90)
    plt.close(fig)


def curves(path, trials, objective, direction="min", top=5):
    """Per-epoch `objective` of the best `top` completed trials."""
    from tuning.report import ranked

    good = ranked(trials, direction)[:top]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(good):
        values = t["history"].get(objective, [])
        ax.plot(range(1, len(values) + 1), values,
                marker=MARKERS[i % len(MARKERS)],
                linestyle=STYLES[i % len(STYLES)],
                linewidth=2.5 if i == 0 else 1.2,
                label=f"trial {t['trial_id']}{' (best)' if i == 0 else ''}"
                      f": {config_text(t)}")
    _log_if_positive(ax, [v for t in good
                          for v in t["history"].get(objective, [])])
    ax.set_xlabel("epoch")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per epoch, the best {len(good)} trials")
    ax.legend(fontsize="small")
    fig.tight_layout()
    rundir.write_figure(fig, path, dpi=90)
    plt.close(fig)


def default_vs_best(path, default, best):
    """Training and validation loss: the paper's defaults vs the best."""
    fig, ax = plt.subplots(figsize=(6, 4))
    values = []
    for trial, name, color, marker in (
            (default, "paper default", "tab:orange", "s"),
            (best, f"best (trial {best['trial_id']}: {config_text(best)})",
             "tab:blue", "o")):
        if trial is None:
            continue
        for key, style in (("loss", "--"), ("val_loss", "-")):
            series = trial["history"].get(key, [])
            values += series
            ax.plot(range(1, len(series) + 1), series, style, color=color,
                    marker=marker, label=f"{name} {key}")
    _log_if_positive(ax, values)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training (dashed) and validation (solid) loss: paper "
                 "default vs best" if default else
                 "training (dashed) and validation (solid) loss of the best")
    ax.legend(fontsize="small")
    fig.tight_layout()
    rundir.write_figure(fig, path, dpi=90)
    plt.close(fig)


def _log_if_positive(ax, values):
    finite = [v for v in values
              if isinstance(v, (int, float)) and math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


def confirmation(path, confirmed):
    """Each configuration's scores over the seeds, mean ± std as a bar."""
    configs = confirmed["configs"]
    fig, ax = plt.subplots(figsize=(1.2 * len(configs) + 2, 3.5))
    for i, config in enumerate(configs):
        color = "tab:orange" if config["is_default"] else "tab:blue"
        ax.scatter([i] * len(config["scores"]), config["scores"],
                   color=color, alpha=0.6)
        ax.errorbar([i + 0.15], [config["mean"]], yerr=[config["std"]],
                    fmt="o", color="black", capsize=4)
    ax.set_xticks(range(len(configs)),
                  [c["label"] for c in configs], fontsize="small")
    ax.set_ylabel(f"{confirmed['objective']} ({confirmed['epochs']} epochs)")
    ax.set_title(f"{len(confirmed['seeds'])} seeds each; bar: mean ± std")
    fig.tight_layout()
    rundir.write_figure(fig, path, dpi=90)
    plt.close(fig)
