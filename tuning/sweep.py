"""Run a keras-tuner search of AdamPlus's hyperparameters on a benchmark.

`sweep()` is the Python API; the CLI (`python -m tuning`) is a thin layer on
it. A search is resumable: rerunning it on the same directory with the same
settings reloads keras-tuner's oracle, keeps every completed trial and
re-runs the one that was interrupted, so it ends with the requested number
of trials. Other settings on the same directory are refused, as is a second
search while one runs.

Arguments, settings and the directory are checked before Keras is imported
(this module imports it only to search), so a mistake costs a fraction of a
second and writes nothing.
"""

import contextlib
import dataclasses
import numbers
import os
import sys
from pathlib import Path

from tuning import benchmarks, launcher, report, rundir
from tuning import workers as machine
from tuning.datasets import check_subset
from tuning.errors import TuningError
from tuning.launcher import SweepFailed
from tuning.search_space import LAYERWISE, SearchSpace
from tuning.seeds import MAX_SEED

TUNERS = ("random", "bayesian", "hyperband", "grid")
# The defaults `sweep()` and the command line share (one place).
DEFAULT_TRIALS = 12
RUNS_FOLDER = "tuning_runs"


def default_directory(benchmark):
    """Where a search of `benchmark` goes by default: tuning_runs/<name>."""
    return Path(RUNS_FOLDER) / benchmark
DIRECTIONS = ("min", "max")
# The smallest value of each integer argument.
MINIMUMS = {"max_trials": 1, "epochs": 1, "batch_size": 1, "grid_steps": 1,
            "seed": 0}
# The largest: what numpy's seeding takes, and counts that fit a C int
# (TensorFlow's and keras-tuner's own counters).
MAXIMUMS = {"seed": MAX_SEED, "max_trials": 2**31 - 1, "epochs": 2**31 - 1,
            "batch_size": 2**31 - 1, "grid_steps": 2**31 - 1}
# What a search wrote besides keras-tuner's project, in a folder of a
# version that kept no manifest (`--overwrite` clears it).
OUTPUTS = (rundir.SETTINGS, "trials.csv", "trials.json", "best.json",
           "summary.txt", "*.png", "confirm.csv", "confirm.json",
           "confirm_runs")

__all__ = ["DEFAULT_TRIALS", "SweepFailed", "check_int", "default_directory",
           "load", "search_settings", "sweep"]


def check_int(name, value, minimum=None, maximum=None):
    """`value` as an int if it is an integer in [`minimum`, `maximum`]
    (defaults `MINIMUMS[name]`, `MAXIMUMS[name]`; NumPy integers are
    accepted), else ValueError in Keras's message shape."""
    minimum = MINIMUMS[name] if minimum is None else minimum
    maximum = MAXIMUMS.get(name) if maximum is None else maximum
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not (
        minimum <= value and (maximum is None or value <= maximum)
    ):
        rule = (f">= {minimum}" if maximum is None
                else f"in [{minimum}, {maximum}]")
        raise ValueError(f"Argument `{name}` must be an integer {rule}."
                         f" Received: {name}={value!r}")
    return value


def search_settings(benchmark="digits", tuner="random",
                    max_trials=DEFAULT_TRIALS,
                    epochs=None, subset=None, seed=0, space=None,
                    dataset=None, batch_size=None, objective="val_loss",
                    direction=None, scale="quick"):
    """The settings of a search, validated, with the scale's defaults filled.

    They are what `settings.json` records and what a resume must match.
    Raises ValueError (in Keras's message shape) for an invalid argument.
    """
    bench = benchmarks.get(benchmark)
    setting = bench.setting(scale)
    if tuner not in TUNERS:
        raise ValueError(f"Argument `tuner` must be one of {', '.join(TUNERS)}."
                         f" Received: tuner={tuner!r}")
    if objective not in bench.objectives():
        raise ValueError(
            f"Argument `objective` must be one of "
            f"{', '.join(bench.objectives())} (what benchmark {benchmark} "
            f"logs). Received: objective={objective!r}"
        )
    if direction not in (None, *DIRECTIONS):
        raise ValueError("Argument `direction` must be None, 'min' or 'max'. "
                         f"Received: direction={direction!r}")
    if dataset is not None and dataset not in bench.datasets:
        choices = (f"one of {', '.join(bench.datasets)}" if bench.datasets
                   else "None (it has no dataset choice)")
        raise ValueError(
            f"Argument `dataset` must be {choices} for benchmark "
            f"{benchmark}. Received: dataset={dataset!r}")
    max_trials = check_int("max_trials", max_trials)
    epochs = None if epochs is None else check_int("epochs", epochs)
    batch_size = None if batch_size is None else check_int("batch_size",
                                                           batch_size)
    seed = check_int("seed", seed)
    subset = check_subset(subset)
    if subset is None:
        subset = setting.subset
    if subset == 1.0 and isinstance(subset, float):
        subset = None  # the fraction 1.0 is all the data, as None is
    space = (space or SearchSpace()).for_tuner(tuner)
    layerwise = [n for n in space.tune if n in LAYERWISE]
    if layerwise and not bench.layerwise:
        raise ValueError(
            f"Argument `tune` names {', '.join(layerwise)}, but benchmark "
            f"{benchmark}'s model has one layer with variables: there is no "
            f"depth to decay over. Received: tune={list(space.tune)!r}")
    return {
        "benchmark": benchmark,
        "dataset": dataset or (bench.datasets or (None,))[0],
        "tuner": tuner, "max_trials": max_trials,
        "epochs": epochs or setting.epochs,
        "batch_size": batch_size or setting.batch_size,
        "subset": subset,
        "scale": scale, "seed": seed, "objective": objective,
        "direction": direction,
        "space": dataclasses.asdict(space),
    }


def sweep(benchmark="digits", tuner="random", max_trials=DEFAULT_TRIALS,
          epochs=None, subset=None, directory=None, seed=0, overwrite=False,
          space=None, dataset=None, idx_dir=None, batch_size=None,
          objective="val_loss", direction=None, scale="quick", workers=0,
          arrays=None, plots=True, child_argv=None, verbose=1, chief=None,
          join=None):
    """Searches AdamPlus's hyperparameters on one benchmark.

    Args:
        benchmark: Name in `tuning.benchmarks.BENCHMARKS`. Defaults to the
            embedded `"digits"`.
        tuner: `"random"`, `"bayesian"`, `"hyperband"` or `"grid"`.
            Defaults to `"random"`.
        max_trials: Number of trials (Hyperband: its own budget from
            `epochs`). On a resume it may grow, not shrink. Defaults to
            `12`, as the command line's.
        epochs: Epochs per trial (Hyperband: the most a trial trains).
            Defaults to `None`: the scale's setting.
        subset: Fraction in (0, 1] or count of training examples. Defaults
            to `None`: the scale's setting.
        directory: Output directory (keras-tuner's project, trials.csv,
            trials.json, best.json, summary.txt, PNG plots). Defaults to
            `tuning_runs/<benchmark>`, as the command line's.
        seed: Seed of the oracle, of the data subset and of every trial's
            initial weights. Defaults to `0`.
        overwrite: Start afresh instead of resuming: removes the previous
            search's files (only those) from `directory`. Defaults to
            `False`.
        space: A `SearchSpace`. Defaults to `None`: `SearchSpace()`, all
            four hyperparameters.
        dataset: For MNIST-shaped benchmarks: `"mnist"` or
            `"fashion_mnist"`. Defaults to `None`: `"mnist"` where the
            benchmark has the choice.
        idx_dir: A folder with the four MNIST IDX files. Defaults to
            `None`: `$MNIST_IDX_DIR`, then `$KERAS_HOME/datasets/mnist-idx`.
        batch_size: Examples per batch. Defaults to `None`: the scale's
            setting.
        objective: A name the benchmark's `fit` logs (`val_loss`, `loss`,
            `val_accuracy`, ...). A trial's score is its value at the
            trial's best epoch. Defaults to `"val_loss"`.
        direction: `"min"` or `"max"`. Defaults to `None`: keras-tuner's
            inference from the objective's name (`accuracy` is maximised).
        scale: `"quick"` (CPU-sized) or `"paper"` (the paper's setting).
            Defaults to `"quick"`.
        workers: If > 0 (or `"auto"`: as many as the machine holds),
            runs keras-tuner's distributed mode: one chief and this many
            worker processes on this machine, each running
            `python -m tuning` with `child_argv` (the CLI passes its own).
            At most one per visible GPU, or per usable CPU core without
            GPUs, and no more than the available memory covers
            (`tuning.workers.bound`). Worker i sees only GPU i; the chief
            sees none. A chief or worker that dies stops the others; the
            children stop when this process does, however it is stopped.
            Defaults to `0`: one process.
        arrays: Injected `((x, y), (x_test, y_test))` in place of the real
            dataset (for stand-ins). Defaults to `None`: the real data.
        plots: Whether to draw the PNG plots. Defaults to `True`.
        child_argv: The command line the chief and workers run; needed
            with `workers` or `chief`. Defaults to `None`.
        verbose: 0: one line per trial; 1: also Keras's progress per epoch
            and a progress bar over the search with its ETA. Defaults to
            `1`.
        chief: `"HOST:PORT"`: serve the oracle there (with `workers` local
            workers, possibly none) and take workers that `join` it; ends
            when every trial has ended. Defaults to loopback at a free
            port, open to the local workers only.
        join: `"HOST:PORT"` of a chief: run one worker of its search, with
            an id of its own. `directory` must be the chief's (a shared
            folder): the worker is refused if its settings or package
            versions differ from the chief's. Defaults to `None`.

    Returns:
        A `tuning.report.SweepResult` (`None` in a distributed chief or
        worker).

    Raises:
        ValueError: An invalid argument.
        tuning.rundir.SettingsMismatch: `directory` holds a search with
            other settings (and `overwrite` is False).
        tuning.rundir.DirectoryBusy: Another search runs on `directory`.
        tuning.rundir.DirectoryUnusable: `directory` cannot be written.
        tuning.datasets.DatasetUnavailable: The data cannot be had.
        SweepFailed: Every trial failed, or a chief or worker died.
    """
    settings = search_settings(
        benchmark, tuner, max_trials, epochs, subset, seed, space, dataset,
        batch_size, objective, direction, scale)
    workers = machine.check_workers(workers)
    address = _address("chief", chief)
    joined = _address("join", join)
    if joined and (workers or address or overwrite):
        raise ValueError("Argument `join` runs one worker of another "
                         "process's search: it takes no `workers`, `chief` "
                         f"or `overwrite`. Received: join={join!r}")
    if (workers or address) and rundir.is_distributed_child():
        raise ValueError("A chief or worker of a distributed search "
                         "launches nothing itself. Received: "
                         f"workers={workers!r}, chief={chief!r}")
    if (workers or address) and child_argv is None:
        raise ValueError("Distributed sweeps run `python -m tuning`: pass "
                         "its arguments as `child_argv`.")
    if joined:
        os.environ.update(  # keras-tuner reads these when the tuner is made
            KERASTUNER_ORACLE_IP=joined[0], KERASTUNER_ORACLE_PORT=str(
                joined[1]),
            KERASTUNER_TUNER_ID=machine.joiner_id())
    directory = Path(directory or default_directory(benchmark))
    child = rundir.is_distributed_child()
    if not joined and (child or not overwrite):  # a joiner checks the chief
        rundir.check_settings(directory, settings,
                              pending=() if direction else ("direction",))
    if overwrite and not child:
        rundir.check_overwritable(directory)
    with contextlib.nullcontext() if child else rundir.lock(directory):
        if not child:  # what a killed run left; no writer of ours is left
            rundir.remove_temporary(directory)
        if workers or address:
            if overwrite:
                rundir.clear(directory, OUTPUTS)
            launcher.run(workers, child_argv, address)
            result = report.write(directory, plots=plots)
            check_not_all_failed(result, directory)
            return result
        return _search(settings, directory, overwrite and not child,
                       (space or SearchSpace()).for_tuner(tuner), idx_dir,
                       arrays, plots,
                       verbose)


def _address(name, text):
    """(host, port) of an address argument, or None."""
    if text is None:
        return None
    try:
        return machine.parse_address(text)
    except ValueError as err:
        raise ValueError(f"Argument `{name}` {err}. Received: "
                         f"{name}={text!r}") from None


def _search(settings, directory, overwrite, space, idx_dir, arrays, plots,
            verbose):
    """The search itself, in this process (Keras is imported here)."""
    from tuning import distributed, tuners

    role = distributed.role()
    if settings["direction"] is None:
        settings["direction"] = tuners.infer_direction(settings["objective"])
    # What decides a trial's numbers besides the options (Keras is loaded
    # now): a resume under another backend is refused.
    settings.update(backend=keras_backend(), versions=report.versions())
    if settings["tuner"] == "grid":  # the summary says how much it visited
        settings["grid_points"] = tuners.grid_points(space)
    if not overwrite and role != "worker":
        rundir.check_settings(directory, settings)
    if role == "worker":
        distributed.check_chief(directory, settings)
    data, hypermodel = load(settings, space, idx_dir, arrays)
    if overwrite:
        rundir.clear(directory, OUTPUTS)
    hypermodel.verbose = (1 if sys.stdout.isatty() else 2) if verbose else 0
    search = tuners.make_tuner(
        hypermodel, tuner=settings["tuner"],
        max_trials=settings["max_trials"], objective=settings["objective"],
        direction=settings["direction"], directory=directory,
        seed=settings["seed"], overwrite=overwrite,
        max_epochs=settings["epochs"])
    if role != "worker":
        # What this search writes, listed before it writes any (one
        # manifest write): --overwrite removes these and no more.
        rundir.note_written(directory, rundir.SETTINGS, search.project_name,
                            *report.TABLES,
                            *(report.PLOTS if plots else ()))
        rundir.write_json(directory / rundir.SETTINGS, dict(
            settings, data=data.source, project=search.project_name))
    if role == "chief":
        # The oracle's own display ("Search: Running Trial #1" tables):
        # `search.search(verbose=0)` would silence it, but the chief serves
        # instead; the workers print this package's trial lines.
        search.oracle.verbose = 0
        distributed.serve(search, directory, settings)
        return None
    if role == "worker":
        distributed.keep_alive(search)
    elif verbose:
        search.progress = _progress(search.oracle)
    try:
        search.search(data.x_train, data.y_train,
                      validation_data=(data.x_val, data.y_val), verbose=0)
    except RuntimeError as err:
        if not str(err).startswith("Number of consecutive failures"):
            raise
        search.oracle.save_all()
    if rundir.is_distributed_child():
        return None  # a chief or worker of a distributed search
    result = report.write(directory, plots=plots)
    check_not_all_failed(result, directory)
    return result


def check_not_all_failed(result, directory):
    """Raises `SweepFailed` (one line, the first error) if every trial of
    `result` ended and none completed, whatever their number."""
    trials = result.trials
    if trials and all(t["status"] in ("FAILED", "DIVERGED") for t in trials):
        first = trials[0]
        raise SweepFailed(
            f"all {len(trials)} trials failed, the first with "
            f"{first['error_type']}: {report.one_line(first['error'], 200)}"
            f"; see {Path(directory) / 'trials.csv'}")


class EmptyValidation(TuningError, ValueError):
    """The data subset leaves no validation examples to score trials on."""


def keras_backend():
    """The Keras backend this process trains with (imports Keras)."""
    import keras

    return keras.backend.backend()


def load(settings, space=None, idx_dir=None, arrays=None):
    """The data and the `AdamPlusHyperModel` that `settings` describe."""
    from tuning.hypermodel import AdamPlusHyperModel

    bench = benchmarks.get(settings["benchmark"])
    data = bench.load(dataset=settings["dataset"], idx_dir=idx_dir,
                      arrays=arrays)
    data = data.subset(settings["subset"], seed=settings["seed"])
    if not len(data.x_val):
        raise EmptyValidation(
            f"subset {settings['subset']!r} leaves "
            f"{report.count_text(len(data.x_train), 'training example')} "
            "and no validation example to score trials on; use a subset of "
            "5 examples or more")
    hypermodel = AdamPlusHyperModel(
        bench, data.x_train.shape[1:],
        space=space or SearchSpace(**settings["space"]),
        batch_size=settings["batch_size"], epochs=settings["epochs"],
        seed=settings["seed"], pretrain_data=data.pretrain)
    return data, hypermodel


def _trials(n):
    return f"{n} trial" + ("" if n == 1 else "s")


def _progress(oracle):
    """A progress display over the trials this run has left, or None."""
    from tuning import progress
    from tuning.tuners import planned_trials

    done = len(oracle.end_order)
    left = planned_trials(oracle) - done
    if left <= 0:
        if done:  # a finished search rerun: its summary follows
            print(f"nothing to run: {_trials(done)} done", flush=True)
        return None
    if done:
        print(f"resuming: {_trials(done)} done, {left} to run", flush=True)
    return progress.make(left, "trial")
