"""PNG plots of a sweep: score vs each hyperparameter, learning curves."""

import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = {  # optimizer argument -> (axis label, value shown on a log axis)
    "learning_rate": ("learning rate alpha", lambda v: v),
    "beta_1": ("1 - beta_1", lambda v: 1 - v),
    "beta_2": ("1 - beta_2", lambda v: 1 - v),
    "epsilon": ("epsilon", lambda v: v),
}


def draw_all(directory, trials, best, default, settings):
    """Writes scores.png, learning_curves.png and default_vs_best.png."""
    objective = settings.get("objective", "val_loss")
    scores(directory / "scores.png", trials, objective)
    curves(directory / "learning_curves.png", trials, objective)
    if best:
        default_vs_best(directory / "default_vs_best.png", default, best)


def scores(path, trials, objective):
    """Score against each hyperparameter on log axes; failures marked x."""
    keys = [k for k in AXES
            if len({t["optimizer"].get(k) for t in trials}) > 1]
    keys = keys or ["learning_rate"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5),
                             squeeze=False)
    good = [t for t in trials if t["score"] is not None]
    failed = [t for t in trials if t["score"] is None]
    top = max((t["score"] for t in good), default=1.0)
    for ax, key in zip(axes[0], keys):
        label, show = AXES[key]
        ax.scatter([show(t["optimizer"][key]) for t in good],
                   [t["score"] for t in good], label="completed")
        if failed:
            ax.scatter([show(t["optimizer"][key]) for t in failed],
                       [top * 1.1] * len(failed), marker="x", color="red",
                       label="diverged / failed")
        for t in good:
            if t.get("is_default"):
                ax.scatter([show(t["optimizer"][key])], [t["score"]],
                           marker="*", s=150, color="orange",
                           label="paper default")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if good and min(t["score"] for t in good) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(objective)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curves(path, trials, objective, top=5):
    """Per-epoch `objective` of the best `top` completed trials."""
    good = sorted((t for t in trials if t["score"] is not None),
                  key=lambda t: t["score"])[:top]
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in good:
        values = t["history"].get(objective, [])
        ax.plot(range(1, len(values) + 1), values, marker=".",
                label=f"trial {t['trial_id']} "
                      f"(lr {t['optimizer']['learning_rate']:.2g})")
    _log_if_positive(ax, [v for t in good
                          for v in t["history"].get(objective, [])])
    ax.set_xlabel("epoch")
    ax.set_ylabel(objective)
    ax.set_title(f"best {len(good)} trials")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def default_vs_best(path, default, best):
    """Training and validation loss: the paper's defaults vs the best."""
    fig, ax = plt.subplots(figsize=(6, 4))
    values = []
    for trial, name, color in ((default, "paper default", "tab:orange"),
                               (best, "best", "tab:blue")):
        if trial is None:
            continue
        for key, style in (("loss", "--"), ("val_loss", "-")):
            series = trial["history"].get(key, [])
            values += series
            ax.plot(range(1, len(series) + 1), series, style, color=color,
                    label=f"{name} {key}")
    _log_if_positive(ax, values)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _log_if_positive(ax, values):
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
