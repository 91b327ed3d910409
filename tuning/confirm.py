"""Trust in the winner: retrain the best configurations over new seeds.

A search scores every trial with one seed (initial weights, batch order,
dropout), so its best trial is partly the luckiest. `confirm` retrains the
`top` best distinct configurations of a finished search and the paper's
defaults with `seeds` new seeds each (the search's seed + 1, + 2, ...,
wrapped below 2**32) at the search's full budget, reports each one's
mean ± sample standard deviation of the score, and decides with Welch's
t-test (one-sided, in the objective's direction;
`scipy.stats.ttest_ind(equal_var=False)`) whether a tuned configuration
beats the defaults beyond seed noise: p below 0.05, Bonferroni-divided by
the number of tuned configurations compared.

Writes `confirm.json`, `confirm.csv` and `confirm.png`, and the summary's
confirmation lines; `best.json` is left as the search wrote it. Each
(configuration, seed) run is saved in `confirm_runs/` as it finishes, so an
interrupted confirmation resumes.
"""

import contextlib
import hashlib
import json
import math
from pathlib import Path

from tuning import progress as progress_display
from tuning import report, rundir
from tuning.errors import TuningError
from tuning.search_space import SearchSpace, is_paper_default
from tuning.seeds import shifted
from tuning.sweep import check_int, load

ALPHA = 0.05
RUNS = report.CONFIRM_RUNS
# The smallest value of each integer argument.
MINIMUMS = {"top": 1, "seeds": 2}


def confirm(directory, top=3, seeds=5, plots=True, idx_dir=None,
            arrays=None, verbose=1):
    """Retrains the `top` best configurations and the defaults, `seeds` times.

    Args:
        directory: A finished search's directory.
        top: How many of the best distinct configurations to retrain.
            Defaults to `3`.
        seeds: New seeds per configuration (at least 2). Defaults to `5`.
        plots: Whether to draw `confirm.png`. Defaults to `True`.
        idx_dir: A folder with the four MNIST IDX files. Defaults to
            `None`: `$MNIST_IDX_DIR`, then `$KERAS_HOME/datasets/mnist-idx`.
        arrays: Injected `((x, y), (x_test, y_test))` stand-in arrays.
            Defaults to `None`: the benchmark's real data.
        verbose: 0: one line per run; 1: also a progress bar with its ETA.
            Defaults to `1`.

    Returns:
        The confirmation (what `confirm.json` holds): `configs`, each with
        `label`, `optimizer` (AdamPlus kwargs), `scores` (one per seed,
        None where the run diverged), `mean`, `std`, and for tuned ones
        `p_value`, `beats_default`, `verdict`; and
        `best_beaten_on_mean_by`: the label of the configuration whose
        mean beat that of best.json's trial (the first), or None.
        best.json is not changed: it stays the search's pick.
    """
    for name, value in (("top", top), ("seeds", seeds)):
        check_int(name, value, MINIMUMS[name])
    directory = Path(directory)
    child = rundir.is_distributed_child()
    with contextlib.nullcontext() if child else rundir.lock(directory):
        settings = rundir.read_settings(directory)
        trials, _ = report.collect(directory)
        direction = report.direction_of(settings)
        configs = _configs(trials, direction, top, settings)
        seed_list = [shifted(settings["seed"], 1 + i) for i in range(seeds)]
        runs = _train_all(directory, settings, configs, seed_list, idx_dir,
                          arrays, verbose, direction)
        for config in configs:
            config["scores"] = runs[config["label"]]
            config.update(_mean_std(config["scores"]))
        default = next(c for c in configs if c["is_default"])
        tuned = [c for c in configs if not c["is_default"]]
        for config in tuned:
            config.update(compare(config["scores"], default["scores"],
                                  direction, ALPHA / len(tuned)))
        result = {"objective": settings["objective"], "direction": direction,
                  "epochs": settings["epochs"], "seeds": seed_list,
                  "alpha": ALPHA, "test": "Welch's t-test, one-sided, "
                  "Bonferroni over the tuned configurations",
                  "configs": configs}
        # Whether another configuration beat best.json's on the mean; the
        # summary says so, and best.json stays the search's pick.
        rival = report.overtaken(result)[1]
        result["best_beaten_on_mean_by"] = rival and rival["label"]
        _write(directory, result, plots)
        return result


def _configs(trials, direction, top, settings):
    """The `top` best distinct configurations, then the paper's defaults."""
    picks, seen = [], set()
    for t in report.ranked(trials, direction):
        key = json.dumps(t["hyperparameters"], sort_keys=True)
        if key not in seen and len(picks) < top:
            seen.add(key)
            picks.append(t)
    if not picks:
        raise TuningError("the search has no completed trial to confirm; "
                          "run it first")
    configs = [{"label": f"trial {t['trial_id']}", "trial_id": t["trial_id"],
                "is_default": t["is_default"], "optimizer": t["optimizer"],
                "hyperparameters": t["hyperparameters"]} for t in picks]
    if not any(c["is_default"] for c in configs):
        # The space's defaults: the paper's, unless the API fixed others.
        kwargs = SearchSpace(**settings["space"]).optimizer_kwargs({})
        configs.append({"label": "paper default" if is_paper_default(kwargs)
                        else "space default", "trial_id": None,
                        "is_default": True, "optimizer": kwargs,
                        "hyperparameters": {}})
    return configs


def _train_all(directory, settings, configs, seed_list, idx_dir, arrays,
               verbose, direction):
    """{label: [score per seed]}; saved runs are reused, not retrained."""
    runs_dir = directory / RUNS
    rundir.note_written(directory, *report.CONFIRM_OUTPUTS)
    runs_dir.mkdir(exist_ok=True)
    data = hypermodel = None
    total = len(configs) * len(seed_list)
    print(f"confirm: {report.count_text(len(configs), 'configuration')} x "
          f"{report.count_text(len(seed_list), 'seed')} = "
          f"{report.count_text(total, 'run')} of "
          f"{report.epochs_text(settings['epochs'])}", flush=True)
    progress = progress_display.make(total, "run") if verbose else None
    scores = {}
    for config in configs:
        scores[config["label"]] = []
        for seed in seed_list:
            key = _key(settings, config["hyperparameters"], seed)
            path = runs_dir / f"{key}.json"
            saved = rundir.read_json(path, "it is run again")
            if saved is None:
                if data is None:
                    data, hypermodel = load(settings, idx_dir=idx_dir,
                                            arrays=arrays)
                    hypermodel.verbose = 0
                saved = {"label": config["label"], "seed": seed,
                         "hyperparameters": config["hyperparameters"],
                         **_train(hypermodel, data, config, seed,
                                  settings["objective"], direction)}
                rundir.write_json(path, saved)
            scores[config["label"]].append(saved["score"])
            shown = ("diverged" if saved["score"] is None
                     else f"{settings['objective']}={saved['score']:.4f}")
            print(f"confirm {config['label']} seed {seed}: {shown}",
                  flush=True)
            if progress is not None:
                progress.add(1)
    return scores


def _key(settings, hyperparameters, seed):
    """A run's identity: what decides its score."""
    decisive = {k: settings.get(k) for k in (
        "benchmark", "dataset", "epochs", "batch_size", "subset", "seed",
        "objective", "space")}
    text = json.dumps([decisive, hyperparameters, seed], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _train(hypermodel, data, config, seed, objective, direction):
    """One run: the score at the best epoch, None if it diverged."""
    import keras
    import keras_tuner

    from tuning.hypermodel import Diverged

    keras.utils.clear_session()
    hypermodel.seed = seed
    hp = keras_tuner.HyperParameters()
    hp.values.update(config["hyperparameters"])
    model = hypermodel.build(hp)
    try:
        history = hypermodel.fit(hp, model, data.x_train, data.y_train,
                                 validation_data=(data.x_val, data.y_val))
    except Diverged as err:
        return {"score": None, "diverged": str(err)}
    values = history.history[objective]
    best = min(values) if direction == "min" else max(values)
    return {"score": float(best), "history": hypermodel.last_history}


def _mean_std(scores):
    finite = [s for s in scores if s is not None]
    if len(finite) < 2:
        return {"mean": math.nan, "std": math.nan}
    mean = sum(finite) / len(finite)
    var = sum((s - mean) ** 2 for s in finite) / (len(finite) - 1)
    return {"mean": mean, "std": math.sqrt(var)}


def compare(tuned, default, direction, alpha=ALPHA):
    """Whether `tuned` scores beat `default` ones beyond seed noise.

    Welch's t-test (`scipy.stats.ttest_ind(equal_var=False)`), one-sided in
    the objective's direction. A configuration that diverged on any seed
    never beats the defaults.
    """
    from scipy import stats

    if any(s is None for s in tuned):
        return {"p_value": None, "beats_default": False,
                "verdict": "diverged on some seeds: not better"}
    default = [s for s in default if s is not None]
    test = stats.ttest_ind(tuned, default, equal_var=False,
                           alternative="less" if direction == "min"
                           else "greater")
    p = float(test.pvalue)
    better = bool(p < alpha)  # a NaN p (no variance at all) is not better
    verdict = (f"beats the defaults beyond seed noise (Welch p = {p:.2g} < "
               f"{alpha:.2g})" if better else
               f"not better than the defaults beyond seed noise (Welch p = "
               f"{p:.2g}, needs < {alpha:.2g})")
    return {"p_value": p, "beats_default": better, "verdict": verdict}


def _write(directory, result, plots):
    rundir.write_json(directory / report.CONFIRM, result)
    keys = sorted({k for c in result["configs"] for k in c["optimizer"]})
    rows = [[c["label"], c["trial_id"] or "", c["is_default"], seed, score,
             *[c["optimizer"].get(k) for k in keys]]
            for c in result["configs"]
            for seed, score in zip(result["seeds"], c["scores"])]
    rundir.write_csv(directory / "confirm.csv",
                     ["label", "trial_id", "is_default", "seed",
                      report.score_column(result["objective"]), *keys], rows)
    if plots:
        from tuning import plots as plotting

        plotting.confirmation(directory / "confirm.png", result)
    report.write(directory, plots=False)
