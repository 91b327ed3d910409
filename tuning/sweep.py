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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tuning import benchmarks, report, rundir
from tuning.datasets import check_subset
from tuning.errors import TuningError
from tuning.search_space import SearchSpace

TUNERS = ("random", "bayesian", "hyperband", "grid")
DIRECTIONS = ("min", "max")
# The smallest value of each integer argument.
MINIMUMS = {"max_trials": 1, "epochs": 1, "batch_size": 1, "workers": 0,
            "grid_steps": 1, "seed": 0}
# What a search writes besides keras-tuner's project (`--overwrite` clears).
OUTPUTS = (rundir.SETTINGS, "trials.csv", "trials.json", "best.json",
           "summary.txt", "*.png", "confirm.csv", "confirm.json",
           "confirm_runs")
# Set in the environment of the chief and workers our launcher starts.
LAUNCHED = "TUNING_LAUNCHED"


class SweepFailed(TuningError):
    """Every trial of a search failed, or its chief or a worker died."""


def check_int(name, value, minimum=None):
    """`value` if it is an integer >= `minimum` (default `MINIMUMS[name]`),
    else ValueError in Keras's message shape."""
    minimum = MINIMUMS[name] if minimum is None else minimum
    if isinstance(value, bool) or not isinstance(value, int) or (
        value < minimum
    ):
        raise ValueError(f"Argument `{name}` must be an integer >= {minimum}."
                         f" Received: {name}={value!r}")
    return value


def search_settings(benchmark="digits", tuner="random", max_trials=10,
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
    for name, value in (("max_trials", max_trials), ("epochs", epochs),
                        ("batch_size", batch_size)):
        if value is not None:
            check_int(name, value)
    check_int("seed", seed)
    subset = check_subset(subset)
    space = space or SearchSpace()
    return {
        "benchmark": benchmark,
        "dataset": dataset or (bench.datasets or (None,))[0],
        "tuner": tuner, "max_trials": max_trials,
        "epochs": epochs or setting.epochs,
        "batch_size": batch_size or setting.batch_size,
        "subset": subset if subset is not None else setting.subset,
        "scale": scale, "seed": seed, "objective": objective,
        "direction": direction,
        "space": dataclasses.asdict(space),
    }


def sweep(benchmark="digits", tuner="random", max_trials=10, epochs=None,
          subset=None, directory="tuning_runs", seed=0, overwrite=False,
          space=None, dataset=None, idx_dir=None, batch_size=None,
          objective="val_loss", direction=None, scale="quick", workers=0,
          arrays=None, plots=True, child_argv=None, verbose=1):
    """Searches AdamPlus's hyperparameters on one benchmark.

    Args:
        benchmark: Name in `tuning.benchmarks.BENCHMARKS`. Defaults to the
            embedded `"digits"`.
        tuner: `"random"`, `"bayesian"`, `"hyperband"` or `"grid"`.
        max_trials: Number of trials (Hyperband: its own budget from
            `epochs`). On a resume it may grow, not shrink.
        epochs: Epochs per trial (Hyperband: the most a trial trains);
            defaults to the scale's setting.
        subset: Fraction in (0, 1] or count of training examples; defaults
            to the scale's setting.
        directory: Output directory (keras-tuner's project, trials.csv,
            trials.json, best.json, summary.txt, PNG plots).
        seed: Seed of the oracle, of the data subset and of every trial's
            initial weights.
        overwrite: Start afresh instead of resuming: removes the previous
            search's files (only those) from `directory`.
        space: A `SearchSpace`; defaults to all four hyperparameters.
        dataset: For MNIST-shaped benchmarks: `"mnist"` or
            `"fashion_mnist"`.
        idx_dir: A folder with the four MNIST IDX files.
        batch_size: Defaults to the scale's setting.
        objective: A name the benchmark's `fit` logs (`val_loss`, `loss`,
            `val_accuracy`, ...). A trial's score is its value at the
            trial's best epoch.
        direction: `"min"` or `"max"`; defaults to keras-tuner's inference
            from the objective's name (`accuracy` is maximised).
        scale: `"quick"` (CPU-sized) or `"paper"` (the paper's setting).
        workers: If > 0, runs keras-tuner's distributed mode on this
            machine: one chief and this many worker processes, each running
            `python -m tuning` with `child_argv` (the CLI passes its own).
            A chief or worker that dies stops the others.
        arrays: Injected `((x, y), (x_test, y_test))` in place of the real
            dataset (for stand-ins).
        plots: Whether to draw the PNG plots.
        child_argv: The command line the chief and workers run.
        verbose: 0: one line per trial; 1: also Keras's progress per epoch
            and a progress bar over the search with its ETA.

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
    check_int("workers", workers)
    if workers and child_argv is None:
        raise ValueError("Distributed sweeps run `python -m tuning`: pass "
                         "its arguments as `child_argv`.")
    directory = Path(directory)
    child = rundir.is_distributed_child()
    if child or not overwrite:
        rundir.check_settings(directory, settings,
                              pending=() if direction else ("direction",))
    with contextlib.nullcontext() if child else rundir.lock(directory):
        if workers:
            if overwrite:
                rundir.clear(directory, OUTPUTS)
            _run_distributed(workers, child_argv)
            return report.write(directory, plots=plots)
        return _search(settings, directory, overwrite and not child,
                       space or SearchSpace(), idx_dir, arrays, plots,
                       verbose)


def _search(settings, directory, overwrite, space, idx_dir, arrays, plots,
            verbose):
    """The search itself, in this process (Keras is imported here)."""
    from tuning import tuners

    if settings["direction"] is None:
        settings["direction"] = tuners.infer_direction(settings["objective"])
        if not overwrite:
            rundir.check_settings(directory, settings)
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
    worker = os.environ.get("KERASTUNER_TUNER_ID", "chief") != "chief"
    if not worker:
        rundir.write_json(directory / rundir.SETTINGS, dict(
            settings, data=data.source, project=search.project_name))
    if verbose and not rundir.is_distributed_child():
        search.progress = _progress(search.oracle)
    try:
        search.search(data.x_train, data.y_train,
                      validation_data=(data.x_val, data.y_val), verbose=0)
    except RuntimeError as err:
        if not str(err).startswith("Number of consecutive failures"):
            raise
        search.oracle.save_all()
        result = report.write(directory, plots=plots)
        last = result.trials[-1]
        raise SweepFailed(
            f"all {len(result.trials)} trials failed, the last with "
            f"{last['error_type']}: {last['error']}; see "
            f"{directory / 'trials.csv'}") from None
    if rundir.is_distributed_child():
        return None  # a chief or worker of a distributed search
    return report.write(directory, plots=plots)


def load(settings, space=None, idx_dir=None, arrays=None):
    """The data and the `AdamPlusHyperModel` that `settings` describe."""
    from tuning.hypermodel import AdamPlusHyperModel

    bench = benchmarks.get(settings["benchmark"])
    data = bench.load(dataset=settings["dataset"], idx_dir=idx_dir,
                      arrays=arrays)
    data = data.subset(settings["subset"], seed=settings["seed"])
    hypermodel = AdamPlusHyperModel(
        bench, data.x_train.shape[1:],
        space=space or SearchSpace(**settings["space"]),
        batch_size=settings["batch_size"], epochs=settings["epochs"],
        seed=settings["seed"])
    return data, hypermodel


def _progress(oracle):
    """Keras's progress bar over the trials this run has left, or None."""
    import keras

    from tuning.tuners import planned_trials

    done = len(oracle.end_order)
    left = planned_trials(oracle) - done
    if left <= 0:
        return None
    if done:
        print(f"resuming: {done} trials done, {left} to run", flush=True)
    return keras.utils.Progbar(left, unit_name="trial")


# ------------------------------------------------------------ distributed


def _run_distributed(workers, child_argv, poll_s=0.5, timeout_s=300,
                     grace_s=10):
    """Runs a chief and `workers` workers of this command on loopback.

    The children re-run the same command line with `--workers 0`. A chief
    or worker that dies (a signal, a non-zero exit) is noticed within
    `poll_s` seconds: the others are stopped and `SweepFailed` says which
    died. The chief exits by itself once every trial has ended; workers
    still running `grace_s` seconds later are stopped (they may be waiting
    on the chief that left).
    """
    argv = _child_argv(child_argv)
    port = _free_port()
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1",
               KERASTUNER_ORACLE_PORT=str(port), **{LAUNCHED: "1"})
    procs = {}
    try:
        chief = procs["the chief"] = subprocess.Popen(
            argv, env=dict(env, KERASTUNER_TUNER_ID="chief"))
        _wait_for_port(port, procs, poll_s, timeout_s)
        for i in range(workers):
            procs[f"worker {i}"] = subprocess.Popen(
                argv, env=dict(env, KERASTUNER_TUNER_ID=f"tuner{i}"))
        workers = list(procs.values())[1:]
        print(f"distributed: chief pid {chief.pid} on 127.0.0.1:{port}, "
              f"worker pids {' '.join(str(p.pid) for p in workers)}",
              flush=True)
        chief_done = None
        while any(p.poll() is None for p in workers):
            _check_exits(procs)
            if chief.poll() is not None:
                chief_done = chief_done or time.time()
                if time.time() - chief_done > grace_s:
                    break
            time.sleep(poll_s)
        _check_exits(procs)
    finally:
        _stop(procs.values())


def _check_exits(procs):
    """Raises `SweepFailed` if a child was killed or exited non-zero."""
    for name, proc in procs.items():
        code = proc.poll()
        if code:
            how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with code {code}")
            others = len(procs) - 1
            raise SweepFailed(
                f"{name} (pid {proc.pid}) {how}; stopped the other "
                f"{others} process{'es' if others != 1 else ''}; rerun the "
                "same command to resume")


def _stop(procs, grace_s=5):
    """Terminates the processes still running; kills them after `grace_s`."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.time() + grace_s
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _child_argv(cli_args):
    """The command line of the children: `--workers`, `--overwrite` dropped."""
    args, skip = [], False
    for arg in cli_args:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--workers="):
            args.append(arg)
    return [sys.executable, "-m", "tuning", *args]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port, procs, poll_s, timeout_s):
    deadline = time.time() + timeout_s
    chief = procs["the chief"]
    while time.time() < deadline:
        _check_exits(procs)
        if chief.poll() is not None:
            raise SweepFailed(f"the chief (pid {chief.pid}) exited before "
                              "serving the oracle")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(poll_s)
    raise SweepFailed(f"the chief did not open port {port} in {timeout_s} s")
