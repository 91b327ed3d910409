"""Trials table export (CSV, JSON), best config and PNG plots.

Everything is rebuilt from the output directory alone (keras-tuner's
`trial.json` files plus our `adam_plus.json` sidecars), so
`python -m tuning report DIR` works on any finished or interrupted search.
"""

import csv
import dataclasses
import json
import math
from importlib import metadata
from pathlib import Path

SETTINGS = "settings.json"
PACKAGES = ("keras", "keras-tuner", "keras-adam-plus", "numpy", "tensorflow",
            "tensorflow-cpu", "jax", "torch")


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns (and `report` rebuilds).

    Attributes:
        directory: The output directory.
        trials: One dict per trial, in trial order (see `collect`).
        best_config: AdamPlus keyword arguments of the best completed trial.
        best_score: Its objective value.
        default_score: The objective of the paper's defaults, if run.
    """

    directory: Path
    trials: list
    best_config: dict
    best_score: float | None
    default_score: float | None


def versions():
    """Installed versions of the packages that decide a trial's numbers."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_settings(directory, settings):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS).write_text(json.dumps(settings, indent=1))


def _project_dir(directory):
    settings = json.loads((directory / SETTINGS).read_text())
    return directory / settings["project"], settings


def collect(directory):
    """Returns (trials, settings) read from `directory`.

    Each trial is a dict: trial_id, status, score, optimizer (AdamPlus
    kwargs), hyperparameters (keras-tuner's values), seed, duration_s,
    history (per-epoch metrics), error, is_default.
    """
    from tuning.search_space import SearchSpace

    directory = Path(directory)
    project, settings = _project_dir(directory)
    space = SearchSpace(**settings.get("space", {}))
    trials = []
    for trial_dir in sorted(project.glob("trial_*"),
                            key=lambda p: p.name.split("_", 1)[1]):
        path = trial_dir / "trial.json"
        if not path.is_file():
            continue
        trial = json.loads(path.read_text())
        side_path = trial_dir / "adam_plus.json"
        side = json.loads(side_path.read_text()) if side_path.is_file() else {}
        values = {k: v for k, v in trial["hyperparameters"]["values"].items()
                  if not k.startswith("tuner/")}
        score = trial.get("score")
        trials.append({
            "trial_id": trial["trial_id"],
            "status": trial["status"],
            "score": score if score is not None and math.isfinite(score)
            else None,
            "optimizer": space.optimizer_kwargs(values),
            "hyperparameters": values,
            "seed": side.get("seed"),
            "duration_s": side.get("duration_s"),
            "history": side.get("history", {}),
            "error": side.get("error"),
            "rss_mb": side.get("rss_mb"),
        })
    defaults = space.optimizer_kwargs({})
    for t in trials:
        t["is_default"] = all(
            math.isclose(t["optimizer"].get(k, v), v, rel_tol=1e-9)
            for k, v in defaults.items() if isinstance(v, float)
        )
    return trials, settings


def write(directory, plots=True):
    """Writes trials.csv, trials.json, best.json (and plots); returns result.

    Only COMPLETED trials with a finite score can be best; failed
    (diverged) trials are listed with their status and error.
    """
    directory = Path(directory)
    trials, settings = collect(directory)
    good = [t for t in trials if t["status"] == "COMPLETED"
            and t["score"] is not None]
    best = min(good, key=lambda t: t["score"]) if good else None
    default = next((t for t in good if t["is_default"]), None)
    (directory / "trials.json").write_text(json.dumps(
        {"settings": settings, "trials": trials}, indent=1))
    _write_csv(directory / "trials.csv", trials)
    if best:
        (directory / "best.json").write_text(
            json.dumps(best["optimizer"], indent=1))
    result = SweepResult(directory, trials,
                         best["optimizer"] if best else {},
                         best["score"] if best else None,
                         default["score"] if default else None)
    (directory / "summary.txt").write_text(summary(result, settings))
    if plots:
        from tuning import plots as plotting

        plotting.draw_all(directory, trials, best, default, settings)
    return result


def _write_csv(path, trials):
    keys = sorted({k for t in trials for k in t["optimizer"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "status", "score", *keys, "seed",
                         "duration_s", "epochs", "is_default", "error"])
        for t in trials:
            epochs = len(next(iter(t["history"].values()), []))
            writer.writerow([
                t["trial_id"], t["status"], t["score"],
                *[t["optimizer"].get(k) for k in keys], t["seed"],
                t["duration_s"], epochs, t["is_default"],
                (t["error"] or "").splitlines()[0] if t["error"] else "",
            ])


def diverged_region(trials):
    """One line per optimizer argument: its range over failed trials."""
    failed = [t for t in trials if t["status"] == "FAILED"]
    if not failed:
        return []
    lines = []
    for key in sorted(failed[0]["optimizer"]):
        values = [t["optimizer"][key] for t in failed
                  if isinstance(t["optimizer"].get(key), float)]
        if values:
            lines.append(f"  {key}: {min(values):.3g} .. {max(values):.3g}")
    return lines


def summary(result, settings):
    """A human-readable summary: best vs the paper's defaults."""
    trials = result.trials
    counts = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    durations = [t["duration_s"] for t in trials if t["duration_s"]]
    lines = [
        f"benchmark {settings.get('benchmark')} ({settings.get('data')}), "
        f"tuner {settings.get('tuner')}, objective "
        f"{settings.get('objective')}",
        "trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
    ]
    if durations:
        lines.append(f"wall time per trial: mean "
                     f"{sum(durations) / len(durations):.1f} s, max "
                     f"{max(durations):.1f} s")
    fmt = "{:<16} {:>12} {:>12}"
    if result.best_config:
        lines.append(fmt.format("", "best", "paper default"))
        default = next((t for t in trials if t["is_default"]), None)
        for key in ("learning_rate", "beta_1", "beta_2", "epsilon"):
            lines.append(fmt.format(
                key, f"{result.best_config.get(key, float('nan')):.4g}",
                f"{default['optimizer'][key]:.4g}" if default else "-"))
        lines.append(fmt.format(
            "score", f"{result.best_score:.4f}",
            f"{result.default_score:.4f}"
            if result.default_score is not None else "-"))
    region = diverged_region(trials)
    if region:
        lines.append("diverged (failed) trials span:")
        lines.extend(region)
    return "\n".join(lines) + "\n"
