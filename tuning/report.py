"""Trials table export (CSV, JSON), best config, summary and PNG plots.

Everything is rebuilt from the output directory alone (keras-tuner's
`trial.json` files plus our `adam_plus.json` sidecars), so
`python -m tuning report DIR` works on any finished or interrupted search.

A trial's score is keras-tuner's: the objective's value at the trial's best
epoch (the lowest `val_loss`, the highest `val_accuracy`). Scores are only
compared between trials trained for the same number of epochs: the best
trial is the best of those trained the most epochs (Hyperband trains some
trials fewer), and the paper's defaults are shown beside it only at that
budget.
"""

import dataclasses
import math
import sys
from importlib import metadata
from pathlib import Path

from tuning import benchmarks, rundir
from tuning.errors import quoted
from tuning.search_space import (
    LAYERWISE,
    MODE_DEFAULTS,
    TUNABLE,
    SearchSpace,
    format_value,
    is_paper_default,
    optimizer_config,
)

PACKAGES = ("keras", "keras-tuner", "keras-adam-plus", "numpy", "tensorflow",
            "tensorflow-cpu", "jax", "torch")
CONFIRM = "confirm.json"
PLOTS = ("scores.png", "learning_curves.png", "default_vs_best.png")
# What `write` writes (a search lists them in its manifest as it starts),
# and what a confirmation writes (listed when it starts).
TABLES = ("trials.json", "trials.csv", "summary.txt", "best.json")
CONFIRM_RUNS = "confirm_runs"
CONFIRM_OUTPUTS = (CONFIRM, "confirm.csv", "confirm.png", CONFIRM_RUNS)


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns (and `report` rebuilds).

    Attributes:
        directory: The output directory.
        trials: One dict per trial, in trial order (see `collect`).
        best_config: The AdamPlus arguments of the best completed trial
            among those trained the most epochs, every one it trained with
            (best.json): `AdamPlus.from_config(best_config)` rebuilds its
            optimizer, learning-rate schedule included (a schedule is in
            Keras's serialized form; without one `AdamPlus(**best_config)`
            works too).
        best_score: Its objective value (at its best epoch).
        default_score: The score of the paper's defaults at the same
            number of epochs, if such a trial ran.
        objective: The objective's name.
        direction: `"min"` or `"max"`.
        epochs: The epochs the best trial (and `default_score`) trained.
    """

    directory: Path
    trials: list
    best_config: dict
    best_score: float | None
    default_score: float | None
    objective: str = "val_loss"
    direction: str = "min"
    epochs: int | None = None


def versions():
    """Installed versions of the packages that decide a trial's numbers."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def direction_of(settings):
    """The search's direction; inferred for settings of older versions."""
    if settings.get("direction"):
        return settings["direction"]
    from tuning.tuners import infer_direction

    return infer_direction(settings.get("objective", "val_loss"))


def collect(directory):
    """Returns (trials, settings) read from `directory`.

    Each trial is a dict: trial_id, status (COMPLETED, DIVERGED: a NaN or
    Inf loss or metric, FAILED: an error, RUNNING or INTERRUPTED: to be run
    again by a resume), score, epochs (trained in all), optimizer (AdamPlus
    kwargs, with `layer_decay` and `head_multiplier` under their names),
    variable_groups (the rules those gave for the model, as best.json
    holds them, or None), hyperparameters (keras-tuner's values), seed,
    duration_s, history (per-epoch metrics), error_type, error, rss_mb,
    worker and device (which process and GPU trained it: `tuning.workers`),
    continued_from (Hyperband: the trial whose weights it went on from, or
    None), final
    (the objective at the last epoch; the score is at the best), schedule
    (the learning-rate schedule it trained with, a key of
    `tuning.search_space.SCHEDULES`, or None), is_default (every argument
    at the paper's value, modes included).
    Raises `tuning.rundir.NoRun` if `directory` holds no search.
    """
    directory = Path(directory)
    settings = rundir.read_settings(directory)
    try:
        space = SearchSpace(**settings.get("space", {}))
    except (TypeError, ValueError) as err:
        raise rundir.DamagedFile(
            f"{directory / rundir.SETTINGS} holds no valid search space "
            f"({err}); rerun the search with --overwrite, or restore the "
            "file") from None
    project = directory / settings["project"]
    trials = []
    for trial_dir in sorted(project.glob("trial_*"),
                            key=lambda p: p.name.split("_", 1)[1]):
        trial = _trial(trial_dir, space, settings)
        if trial:
            trials.append(trial)
    schedule = _schedule(settings)
    for t in trials:
        t["schedule"] = schedule
        t["final"] = final_value(t, settings["objective"])
        t["is_default"] = is_paper_default(t["optimizer"])
    return trials, settings


def final_value(trial, objective):
    """A trial's `objective` at its last epoch (its score is at its best
    epoch), or None if it has no finite value there."""
    values = trial["history"].get(objective) or [None]
    last = values[-1]
    return last if isinstance(last, (int, float)) and math.isfinite(
        last) else None


def _schedule(settings):
    """The learning-rate schedule the benchmark of `settings` trains with."""
    name = settings.get("benchmark")
    return (benchmarks.BENCHMARKS[name].schedule
            if name in benchmarks.BENCHMARKS else None)


def _trial(trial_dir, space, settings):
    state_path = trial_dir / "trial.json"
    side = rundir.read_json(trial_dir / rundir.SIDECAR,
                            "its seed, history and error are not shown") or {}
    state = rundir.read_json(
        state_path, "its trial counts as interrupted: a resume runs it again")
    if state is None and not state_path.exists():
        return None
    if not isinstance(side, dict):
        print(f"warning: {quoted(trial_dir / rundir.SIDECAR)} is not a trial's "
              "record; its seed, history and error are not shown",
              file=sys.stderr, flush=True)
        side = {}
    if state is not None and not (
        isinstance(state, dict) and isinstance(state.get("hyperparameters"),
                                               dict)
        and isinstance(state["hyperparameters"].get("values"), dict)
        and isinstance(state.get("status"), str)
    ):
        print(f"warning: {quoted(state_path)} is not a trial's state; its "
              "trial counts as interrupted: a resume runs it again",
              file=sys.stderr, flush=True)
        state = None
    if state is None:
        values = side.get("values")
        values = values if isinstance(values, dict) else {}
        status, score = "INTERRUPTED", None
    else:
        values = state["hyperparameters"]["values"]
        status, score = state["status"], state.get("score")
        if status == "FAILED" and side.get("status") == "DIVERGED":
            status = "DIVERGED"
    epochs = (side.get("epochs") or values.get("tuner/epochs")
              or settings.get("epochs"))
    parent = values.get("tuner/trial_id")  # Hyperband: weights carried on
    values = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    return {
        "trial_id": trial_dir.name.split("_", 1)[1],
        "status": status,
        "score": score if isinstance(score, (int, float))
        and math.isfinite(score) else None,
        "epochs": epochs,
        "optimizer": space.optimizer_kwargs(values),
        "hyperparameters": values,
        "seed": side.get("seed"),
        "duration_s": side.get("duration_s"),
        "history": (side.get("history") if isinstance(
            side.get("history"), dict) else {}),
        "error_type": side.get("error_type"),
        "error": side.get("error"),
        "rss_mb": side.get("rss_mb"),
        "worker": side.get("worker"),
        "device": side.get("device"),
        "continued_from": parent if isinstance(parent, str) else None,
        "variable_groups": (side.get("variable_groups") if isinstance(
            side.get("variable_groups"), list) else None),
    }


def choose(trials, direction):
    """(best, default): the best completed trial among those trained the
    most epochs, and the paper's defaults at that budget (or None)."""
    good = [t for t in trials if t["status"] == "COMPLETED"
            and t["score"] is not None]
    if not good:
        return None, None
    top = max(t["epochs"] for t in good)
    level = [t for t in good if t["epochs"] == top]
    pick = min if direction == "min" else max
    best = pick(level, key=lambda t: t["score"])
    default = next((t for t in level if t["is_default"]), None)
    return best, default


def ranked(trials, direction):
    """Completed trials, best first: most epochs, then score."""
    good = [t for t in trials if t["status"] == "COMPLETED"
            and t["score"] is not None]
    sign = 1 if direction == "min" else -1
    return sorted(good, key=lambda t: (-t["epochs"], sign * t["score"]))


def write(directory, plots=True):
    """Writes trials.csv, trials.json, best.json, summary.txt (and plots).

    Only COMPLETED trials with a finite score can be best; diverged and
    failed trials are listed with their status and error. Every file is
    written atomically. Returns the `SweepResult`.
    """
    directory = Path(directory)
    trials, settings = collect(directory)
    result = sweep_result(directory, trials, settings)
    # A no-op where the search listed them (`report` on an older folder).
    rundir.note_written(directory, *TABLES, *(PLOTS if plots else ()))
    rundir.write_json(directory / "trials.json",
                      {"settings": settings, "trials": trials})
    _write_csv(directory / "trials.csv", trials, settings["objective"])
    if result.best_config:
        rundir.write_json(directory / "best.json", result.best_config)
    rundir.write_text(directory / "summary.txt", summary(
        result, settings, running=rundir.running(directory)))
    if plots:
        from tuning import plots as plotting

        best, default = choose(trials, result.direction)
        plotting.draw_all(directory, trials, best, default, settings,
                          result.direction)
    return result


def sweep_result(directory, trials, settings):
    """The `SweepResult` of `trials`: best and defaults at the same budget."""
    direction = direction_of(settings)
    best, default = choose(trials, direction)
    return SweepResult(Path(directory), trials,
                       _best_config(best) if best else {},
                       best["score"] if best else None,
                       default["score"] if default else None,
                       settings["objective"], direction,
                       best["epochs"] if best else None)


def _best_config(best):
    """best.json of trial `best`: its layer-wise values as the
    `variable_groups` its sidecar recorded."""
    groups = best.get("variable_groups")
    if groups is None and not all(
            best["optimizer"].get(k, v) == v for k, v in LAYERWISE.items()):
        print(f"warning: trial {best['trial_id']}'s record holds no "
              "variable_groups: best.json lacks its layer-wise learning "
              "rates", file=sys.stderr, flush=True)
    return optimizer_config(best["optimizer"], best.get("schedule"), groups)


def score_column(objective):
    """trials.csv's score column: the objective at the best epoch."""
    return f"{objective}_at_best_epoch"


def _write_csv(path, trials, objective):
    keys = sorted({k for t in trials for k in t["optimizer"]})
    rows = [[t["trial_id"], t["status"], t["epochs"], t["score"],
             t.get("final"), *[t["optimizer"].get(k) for k in keys],
             t.get("schedule") or "constant", t["seed"],
             t["duration_s"], t["is_default"], t["error_type"] or "",
             one_line(t["error"]), t["worker"] or "", t["device"] or ""]
            for t in trials]
    rundir.write_csv(path, ["trial_id", "status", "epochs",
                            score_column(objective),
                            f"{objective}_at_final_epoch", *keys,
                            "learning_rate_schedule", "seed",
                            "duration_s", "is_default", "error_type",
                            "error", "worker", "device"], rows)


def diverged_region(trials):
    """One line per optimizer argument: its range over diverged trials."""
    diverged = [t for t in trials if t["status"] == "DIVERGED"]
    if not diverged:
        return []
    lines = []
    for key in sorted(diverged[0]["optimizer"]):
        values = [t["optimizer"][key] for t in diverged
                  if isinstance(t["optimizer"].get(key), float)]
        if values:
            lines.append(f"  {key}: {format_value(key, min(values))} .. "
                         f"{format_value(key, max(values))}")
    return lines


def one_line(text, limit=300):
    """`text` with its whitespace collapsed into one line of <= `limit`."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def epochs_text(n):
    """"1 epoch", "3 epochs"."""
    return count_text(n, "epoch")


def count_text(n, noun):
    """"1 trial", "3 trials"."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def summary(result, settings, running=None):
    """A human-readable summary: best vs the paper's defaults, failures,
    and the confirmation over seeds if one ran. `running`: who runs the
    search now (`tuning.rundir.running`), if it runs."""
    trials = result.trials
    counts = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    durations = [t["duration_s"] for t in trials if t["duration_s"]]
    lines = [
        f"benchmark {settings.get('benchmark')} ({settings.get('data')}), "
        f"tuner {settings.get('tuner')}",
        f"objective {result.objective}, "
        f"{'minimised' if result.direction == 'min' else 'maximised'}; "
        "score = its value at a trial's best epoch",
        "trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
    ]
    points = settings.get("grid_points")
    if points:
        lines.append(f"grid: {len(trials)} of {points} points visited" + (
            f"; --max-trials stopped it before the other "
            f"{points - len(trials)}" if len(trials) < points else ""))
    if durations:
        lines.append(f"wall time per trial: mean "
                     f"{sum(durations) / len(durations):.1f} s, max "
                     f"{max(durations):.1f} s")
    if result.best_config:
        lines += _best_vs_default(result, trials)
        lines += _final_vs_best(result, trials)
        best = choose(trials, result.direction)[0]
        if best.get("continued_from"):
            lines.append(
                f"the best trial continued trial {best['continued_from']}'s "
                "weights (Hyperband): best.json rebuilds its optimizer, but "
                "training from scratch will not give its score exactly; "
                "--confirm retrains it from scratch")
    region = diverged_region(trials)
    if region:
        lines.append("diverged (NaN/Inf loss) trials span:")
        lines.extend(region)
    for t in trials:
        if t["status"] == "FAILED":
            lines.append(f"trial {t['trial_id']} failed with an error (not "
                         f"divergence): {t['error_type']}: "
                         f"{one_line(t['error'], 200)}")
        elif t["status"] == "RUNNING" and running:
            lines.append(f"trial {t['trial_id']} is running (the search "
                         f"runs: {running})")
        elif t["status"] in ("RUNNING", "INTERRUPTED"):
            lines.append(f"trial {t['trial_id']} was interrupted; rerun the "
                         "same command to finish it")
    confirmed = rundir.read_json(Path(result.directory) / CONFIRM)
    if confirmed:
        lines += confirm_lines(confirmed)
    return "\n".join(lines) + "\n"


def _best_vs_default(result, trials):
    fmt = "{:<24} {:>12} {:>14}"
    default = next((t for t in trials if t["is_default"]), None)
    best = choose(trials, result.direction)[0]
    lines = [fmt.format("", "best", "paper default")]
    shown = [*TUNABLE, *sorted(
        {k for k in best["optimizer"] if k not in TUNABLE}
        | {k for k in (default or {"optimizer": {}})["optimizer"]
           if k not in TUNABLE})]
    for key in shown:
        lines.append(fmt.format(
            key, _shown(key, best["optimizer"]),
            _shown(key, default["optimizer"]) if default else "-"))
    if best.get("schedule"):
        lines.append(fmt.format("learning_rate schedule", best["schedule"],
                                best["schedule"] if default else "-"))
    lines.append(fmt.format(
        f"{result.objective}, {epochs_text(result.epochs)}",
        f"{result.best_score:.4f}",
        f"{result.default_score:.4f}" if result.default_score is not None
        else "not run"))
    if result.default_score is None:
        elsewhere = [t for t in trials if t["is_default"]
                     and t["status"] == "COMPLETED" and t["score"] is not None]
        for t in elsewhere:
            lines.append(f"paper default: {t['score']:.4f} after "
                         f"{epochs_text(t['epochs'])} only (not comparable "
                         f"with {epochs_text(result.epochs)})")
    return lines


def _final_vs_best(result, trials):
    """A line when the best trial's last epoch is further from its best
    epoch than the scores of the trials are from each other."""
    best = choose(trials, result.direction)[0]
    level = [t["score"] for t in trials if t["status"] == "COMPLETED"
             and t["score"] is not None and t["epochs"] == result.epochs]
    if best.get("final") is None or len(level) < 2:
        return []
    mean = sum(level) / len(level)
    spread = math.sqrt(sum((s - mean) ** 2 for s in level)
                       / (len(level) - 1))
    gap = abs(best["final"] - best["score"])
    if gap <= spread:
        return []
    return [f"the best trial's {result.objective} at its last epoch, "
            f"{best['final']:.4f}, is {gap:.4f} from its best epoch's "
            f"{best['score']:.4f}: more than the trials' spread ({spread:.4f}"
            ", sample std); its score is optimistic: --confirm retrains "
            "it over new seeds"]


def _shown(key, kwargs):
    """AdamPlus argument `key` of `kwargs` for the summary's table; a mode
    not given is at its default."""
    value = kwargs.get(key, MODE_DEFAULTS.get(key, "-"))
    return format_value(key, value)


def confirm_lines(confirmed):
    """The summary's lines on a confirmation (`confirm.json`)."""
    lines = [
        f"confirmation: {len(confirmed['seeds'])} new seeds "
        f"({', '.join(map(str, confirmed['seeds']))}), "
        f"{epochs_text(confirmed['epochs'])} each; {confirmed['objective']} "
        "mean ± std (sample):"
    ]
    for config in confirmed["configs"]:
        verdict = config.get("verdict", "")
        lines.append(f"  {config['label']:<14} {config['mean']:.4f} ± "
                     f"{config['std']:.4f}  {verdict}".rstrip())
    best, rival = overtaken(confirmed)
    if rival:
        lines.append(
            f"note: {rival['label']} beat best.json's {best['label']} on the "
            f"confirmed mean ({rival['mean']:.4f} ± {rival['std']:.4f} vs "
            f"{best['mean']:.4f} ± {best['std']:.4f}); best.json keeps the "
            "search's pick (one seed, chosen before the confirmation). "
            f"Next step: to train with {rival['label']}'s configuration, "
            "use its \"optimizer\" in confirm.json with "
            "AdamPlus.from_config")
    return lines


def overtaken(confirmed):
    """(best.json's configuration, the one of the others whose confirmed
    mean beats it, or None) in a confirmation (`confirm.json`). best.json's
    is the first: the search's best trial."""
    configs = confirmed["configs"]
    sign = 1 if confirmed.get("direction", "min") == "min" else -1
    best = configs[0]
    if not math.isfinite(best["mean"]):
        return best, None
    better = [c for c in configs[1:] if math.isfinite(c["mean"])
              and sign * c["mean"] < sign * best["mean"]]
    return best, min(better, key=lambda c: sign * c["mean"], default=None)
