"""Figures like the paper's (PNG) and the replication's markdown report.

Everything is drawn from the results `tuning.replicate` saved
(`<dir>/figure<N>.json`), so the report can be rebuilt at any time.
"""

import math
from pathlib import Path

import numpy as np

from tuning import rundir
from tuning.claims import BY_FAR, SIMILAR, short


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_cost_figure(path, panels, zoom=False):
    """The paper's training-cost panels: cost per epoch, one line each."""
    plt = _plt()
    columns = [(p, False) for p in panels]
    if zoom:
        columns = [(panels[0], True), (panels[0], False)]
    fig, axes = plt.subplots(1, len(columns), squeeze=False,
                             figsize=(5.2 * len(columns), 4))
    for ax, (panel, zoomed) in zip(axes[0], columns):
        ax.set_title(panel["title"] + (" (first epochs)" if zoomed else ""))
        ax.set_xlabel("iterations over entire dataset")
        ax.set_ylabel("training cost")
        if "not_run" in panel:
            ax.text(0.5, 0.5, "not run:\n" + _wrap(short(panel["not_run"])),
                    ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
            continue
        for curve in panel["curves"].values():
            if zoomed and curve.get("zoom_epoch"):
                ax.plot(curve["zoom_epoch"], curve["zoom_loss"],
                        label=curve["label"])
            elif curve.get("loss"):
                ax.plot(range(1, len(curve["loss"]) + 1), curve["loss"],
                        label=curve["label"], marker=".")
        if panel.get("log_y") and not zoomed:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wrap(text, width=48):
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) > width:
            lines.append(line)
            line = ""
        line += word + " "
    return "\n".join(lines + [line])


def draw_figure4(path, result):
    """2 x 3 panels (early, late epoch x beta_2); loss vs log10(alpha)."""
    plt = _plt()
    beta_2s = sorted({r["beta_2"] for r in result["runs"]})
    epochs = result["scale"]["epochs"]
    fig, axes = plt.subplots(2, len(beta_2s), squeeze=False,
                             figsize=(4.2 * len(beta_2s), 7), sharey="row")
    finite = [r[c] for r in result["runs"] for c in ("early", "late")
              if math.isfinite(r[c])]
    cap = (max(finite) if finite else 1.0) * 1.05
    for row, (checkpoint, epoch) in enumerate(zip(("early", "late"),
                                                  epochs)):
        for col, beta_2 in enumerate(beta_2s):
            ax = axes[row][col]
            for beta_1, style in ((0.0, "--"), (0.9, "-")):
                for corrected, color in ((True, "tab:red"),
                                         (False, "tab:green")):
                    runs = sorted((r for r in result["runs"]
                                   if r["beta_2"] == beta_2
                                   and r["beta_1"] == beta_1
                                   and r["bias_correction"] == corrected),
                                  key=lambda r: r["log10_alpha"])
                    if not runs:
                        continue
                    ax.plot([r["log10_alpha"] for r in runs],
                            [min(r[checkpoint], cap) for r in runs],
                            style, color=color, marker="o",
                            label=f"beta_1={beta_1}, "
                            + ("bias correction" if corrected
                               else "no correction"))
            ax.set_title(f"beta_2={beta_2}, after {epoch} epochs")
            ax.set_xlabel("log10(alpha)")
            if col == 0:
                ax.set_ylabel("loss (negative ELBO; capped = diverged)")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_amsgrad(path, result):
    """x_t of Adam and AMSGrad on the counterexample."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("adam", "AdamPlus"),
                        ("amsgrad", "AdamPlus(amsgrad=True)")):
        ax.plot(result[name]["t"], result[name]["x"], label=label)
    ax.axhline(-1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step t")
    ax.set_ylabel("x_t")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("Reddi et al. (2018) counterexample (optimum x = -1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)



def draw(directory, result):
    """Draws the PNG of one figure's saved result."""
    figure = result["figure"]
    path = Path(directory) / f"figure{figure}.png"
    if "panels" in result:
        draw_cost_figure(path, result["panels"], zoom=any(
            p.get("zoom_epochs") for p in result["panels"]))
    elif "grid" in result:
        if "not_run" not in result["grid"]:
            draw_figure4(path, result["grid"])
    else:
        draw_amsgrad(path, result["run"])


def write_report(directory, figures, settings):
    """Writes `<directory>/report.md` from the saved figure results.

    Args:
        directory: The replication's output folder.
        figures: Figure names, in report order (those saved are shown).
        settings: Markdown lines of the settings common to all figures.
    """
    directory = Path(directory)
    results = [rundir.read_json(directory / f"figure{f}.json",
                                "the figure is left out; rerun it")
               for f in figures]
    results = [r for r in results if r]
    lines = ["# Adam paper replication (keras-adam-plus)", "",
             "Claims of Kingma & Ba (2015), Section 6, and of Reddi et al. "
             "(2018), decided on this run's numbers. Training cost = the "
             "mean minibatch loss of each epoch as `model.fit` reports it "
             "(with dropout and L2 terms, like the paper's).", "",
             "| figure | claim | result | numbers |", "|---|---|---|---|"]
    for result in results:
        for claim in result["claims"]:
            lines.append(f"| {result['figure']} | {claim['claim']} | "
                         f"**{claim['result']}** | {claim['detail']} |")
    counts = {}
    for result in results:
        for claim in result["claims"]:
            counts[claim["result"]] = counts.get(claim["result"], 0) + 1
    lines += ["", "Totals: " + ", ".join(f"{k} {v}" for k, v in
                                         sorted(counts.items())), ""]
    if any(r["scale"] == "tiny" for r in results):
        lines += ["**Scale `tiny` is a smoke test of the machinery: a few "
                  "hundred examples, one or two epochs, one trial. It "
                  "decides none of the Adam paper's claims (figures 1-4 read "
                  "UNDECIDED, with what they would read); run `--scale "
                  "quick` or `--scale full`.**", ""]
    caveats = [f"- Figure {r['figure']} (scale `{r['scale']}`): "
               f"{r['caveat']}" for r in results if r.get("caveat")]
    if caveats:
        lines += ["What the smaller scale cannot decide:", "", *caveats, ""]
    total = sum(_seconds(r) for r in results)
    lines += [f"Wall time: {total:.0f} s in all (per figure, the runs that "
              "wrote its results; a resumed run adds its own time).", ""]
    for result in results:
        lines += _report_section(directory, result)
    lines += ["## Settings common to all", "", *settings,
              f"- Margins: 'similar' / 'equal or better' = within "
              f"{SIMILAR:.0%}; 'by far' / 'much faster' = at least "
              f"{BY_FAR:.0%} lower.", ""]
    path = directory / "report.md"
    rundir.write_text(path, "\n".join(lines) + "\n")
    return path


def _report_section(directory, result):
    figure = result["figure"]
    lines = [f"## Figure {figure}" if figure != "amsgrad"
             else "## AMSGrad counterexample (Reddi et al. 2018)", ""]
    if (Path(directory) / f"figure{figure}.png").exists():
        lines += [f"![figure {figure}](figure{figure}.png)", ""]
    lines.append(f"Scale `{result['scale']}`, backend "
                 f"{result['backend']}, seed {result['seed']}, wall time "
                 f"{_seconds(result):.0f} s.")
    lines.append("")
    for panel in result.get("panels", []) + ([result["grid"]]
                                             if "grid" in result else []):
        if "not_run" in panel:  # the whole reason: what to put where
            lines += [f"- {panel['title']}: **not run**: "
                      f"{panel['not_run']}", ""]
            continue
        scale = panel["scale"]
        lines.append(
            f"- {panel['title']}: data {panel['data']}, "
            f"{panel['examples']} training examples, batch "
            f"{panel['batch_size']}, scale {scale}.")
        for curve in panel.get("curves", {}).values():
            if curve.get("loss"):
                seconds = curve.get("epoch_seconds") or [0]
                lines.append(
                    f"  - {curve['label']}: best {curve['hp']}"
                    + (" (at the grid's edge)" if curve.get("at_edge")
                       else "") + ", final cost "
                    f"{curve['loss'][-1]:.4g}, "
                    f"{np.mean(seconds):.2f} s/epoch, trials: "
                    + ", ".join(_trial_text(t) for t in curve["trials"]))
            else:
                lines.append(f"  - {curve['label']}: every trial failed")
        lines.append("")
    if "run" in result:
        run = result["run"]
        lines += [f"- {run['steps']} steps, alpha {run['learning_rate']}, "
                  "beta_1 0.9, beta_2 0.99, x_0 = 0, projected onto [-1, 1] "
                  "by a weight constraint.", ""]
    return lines


def _seconds(result):
    return result.get("wall_seconds_total", result["wall_seconds"])


def _trial_text(trial):
    hp = ", ".join(f"{k}={v:.3g}" for k, v in trial["hp"].items())
    final = "diverged" if trial["final"] is None else f"{trial['final']:.4g}"
    return f"({hp}) {final}"
