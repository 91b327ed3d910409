"""Run a keras-tuner search of AdamPlus's hyperparameters on a benchmark.

`sweep()` is the Python API; the CLI (`python -m tuning`) is a thin layer on
it. A search is resumable: rerunning it on the same directory reloads
keras-tuner's oracle, keeps every completed trial and re-runs the one that
was interrupted, so it ends with the requested number of trials.
"""

import dataclasses
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import keras_tuner
from keras_tuner import oracles

from tuning import benchmarks, report
from tuning.hypermodel import AdamPlusHyperModel

TUNERS = ("random", "bayesian", "hyperband", "grid")
SIDECAR = "adam_plus.json"


class _DefaultsFirst:
    """Oracle mixin: the first new trial evaluates the default values."""

    def _random_values(self):
        hps = self.get_space()
        defaults = {hp.name: hp.default for hp in hps.space
                    if hps.is_active(hp)}
        if not self._duplicate(defaults):
            return defaults
        return super()._random_values()


def _oracle_class(name):
    base = {
        "random": oracles.RandomSearchOracle,
        "bayesian": oracles.BayesianOptimizationOracle,
        "hyperband": oracles.HyperbandOracle,
        # GridSearch starts from the defaults by itself.
        "grid": oracles.GridSearchOracle,
    }[name]
    if name == "grid":
        return base
    return type(f"DefaultsFirst{base.__name__}", (_DefaultsFirst, base), {})


class _Bookkeeping:
    """Tuner mixin: records seed, duration, history and versions per trial.

    Writes `trial_<id>/adam_plus.json` beside keras-tuner's `trial.json`,
    prints one progress line per trial and collects garbage after each.
    """

    def run_trial(self, trial, *args, **kwargs):
        start = time.time()
        self.hypermodel.last_history = {}
        error = None
        try:
            return super().run_trial(trial, *args, **kwargs)
        except Exception as err:
            error = err
            raise
        finally:
            record = {
                "trial_id": trial.trial_id,
                "seed": self.hypermodel.seed,
                "duration_s": round(time.time() - start, 3),
                "history": self.hypermodel.last_history,
                "error": None if error is None else str(error)[:500],
                "backend": keras.backend.backend(),
                "rss_mb": _rss_mb(),
                "versions": report.versions(),
            }
            path = Path(self.get_trial_dir(trial.trial_id)) / SIDECAR
            path.write_text(json.dumps(record, indent=1))

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        gc.collect()
        done = self.oracle.get_trial(trial.trial_id)
        score = done.score
        values = self.hypermodel.space.optimizer_kwargs(
            done.hyperparameters.values
        )
        # Betas near 1 need more digits than alpha and epsilon.
        shown = " ".join(
            f"{k}={v:.5g}" if k.startswith("beta") else f"{k}={v:.3g}"
            for k, v in values.items() if isinstance(v, float)
        )
        result = (f"{self.oracle.objective.name}={score:.4f}"
                  if score is not None else str(done.status))
        print(f"trial {trial.trial_id}: {shown} -> {result}", flush=True)


class AdamPlusTuner(_Bookkeeping, keras_tuner.Tuner):
    """A keras-tuner `Tuner` with AdamPlus bookkeeping."""


class AdamPlusHyperband(_Bookkeeping, keras_tuner.Hyperband):
    """keras-tuner's Hyperband (epochs per bracket) with bookkeeping."""

    def __init__(self, oracle, hypermodel, **kwargs):
        # Hyperband.__init__ only builds its oracle; ours is built already.
        keras_tuner.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel,
                                   **kwargs)


def make_tuner(hypermodel, tuner="random", max_trials=10, objective="val_loss",
               directory="tuning_runs", project_name=None, seed=0,
               overwrite=False, max_epochs=None):
    """Builds an `AdamPlusTuner` (or Hyperband) around `hypermodel`."""
    if tuner not in TUNERS:
        raise ValueError(
            f"Argument `tuner` must be one of {', '.join(TUNERS)}. "
            f"Received: tuner={tuner!r}"
        )
    common = dict(objective=objective, seed=seed,
                  max_consecutive_failed_trials=max(3, max_trials))
    if tuner == "hyperband":
        oracle = _oracle_class(tuner)(
            max_epochs=max_epochs or hypermodel.epochs, factor=3,
            hyperband_iterations=1, **common,
        )
        cls = AdamPlusHyperband
    else:
        oracle = _oracle_class(tuner)(max_trials=max_trials, **common)
        cls = AdamPlusTuner
    return cls(oracle=oracle, hypermodel=hypermodel, directory=str(directory),
               project_name=project_name or hypermodel.name,
               overwrite=overwrite)


def sweep(benchmark="digits", tuner="random", max_trials=10, epochs=None,
          subset=None, directory="tuning_runs", seed=0, overwrite=False,
          space=None, dataset=None, idx_dir=None, batch_size=None,
          objective="val_loss", scale="quick", workers=0, arrays=None,
          plots=True, child_argv=None):
    """Searches AdamPlus's hyperparameters on one benchmark.

    Args:
        benchmark: Name in `tuning.benchmarks.BENCHMARKS`. Defaults to the
            embedded `"digits"`.
        tuner: `"random"`, `"bayesian"`, `"hyperband"` or `"grid"`.
        max_trials: Number of trials (Hyperband: its own budget from
            `epochs`).
        epochs: Epochs per trial; defaults to the scale's setting.
        subset: Fraction or count of training examples; defaults to the
            scale's setting.
        directory: Output directory (keras-tuner's project, trials.csv,
            trials.json, best.json, PNG plots).
        seed: Seed of the oracle and of every trial's initial weights.
        overwrite: Start afresh instead of resuming.
        space: A `SearchSpace`; defaults to all four hyperparameters.
        dataset: For MNIST-shaped benchmarks: `"mnist"` or
            `"fashion_mnist"`.
        idx_dir: A folder with the four MNIST IDX files.
        batch_size: Defaults to the scale's setting.
        objective: keras-tuner objective, minimised if it ends in "loss".
        scale: `"quick"` (CPU-sized) or `"paper"` (the paper's setting).
        workers: If > 0, runs keras-tuner's distributed mode on this
            machine: one chief and this many worker processes, each running
            `python -m tuning` with `child_argv` (the CLI passes its own).
        arrays: Injected `((x, y), (x_test, y_test))` in place of the real
            dataset (for stand-ins).
        plots: Whether to draw the PNG plots.

    Returns:
        A `tuning.report.SweepResult` (`None` in a distributed worker).
    """
    bench = benchmarks.get(benchmark)
    setting = {"quick": bench.quick, "paper": bench.paper}[scale]
    epochs = epochs or setting.epochs
    directory = Path(directory)
    if workers:
        if child_argv is None:
            raise ValueError("Distributed sweeps run `python -m tuning`: "
                             "pass its arguments as `child_argv`.")
        _run_distributed(workers, directory, overwrite, child_argv)
        return report.write(directory, plots=plots)
    data = bench.load(dataset=dataset or (bench.datasets or (None,))[0],
                      idx_dir=idx_dir, arrays=arrays)
    data = data.subset(subset if subset is not None else setting.subset,
                       seed=seed)
    hypermodel = AdamPlusHyperModel(
        bench, data.x_train.shape[1:], space=space,
        batch_size=batch_size or setting.batch_size, epochs=epochs, seed=seed,
    )
    search = make_tuner(hypermodel, tuner=tuner, max_trials=max_trials,
                        objective=objective, directory=directory, seed=seed,
                        overwrite=overwrite, max_epochs=epochs)
    report.write_settings(directory, {
        "benchmark": benchmark, "tuner": tuner, "max_trials": max_trials,
        "epochs": epochs, "subset": subset, "scale": scale, "seed": seed,
        "batch_size": hypermodel.batch_size, "objective": objective,
        "data": data.source, "project": search.project_name,
        "space": dataclasses.asdict(hypermodel.space),
    })
    search.search(data.x_train, data.y_train,
                  validation_data=(data.x_val, data.y_val), verbose=0)
    if os.environ.get("KERASTUNER_TUNER_ID"):
        return None  # a worker of a distributed search: the launcher reports
    return report.write(directory, plots=plots)


def _rss_mb():
    """Resident memory of this process now, in MiB (Linux), else peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                     / 1024, 1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(workers, directory, overwrite, child_argv,
                     timeout=3600, chief_grace=30):
    """Starts a chief and `workers` workers of this command on loopback.

    The children re-run the same command line with `--workers 0`. Waits for
    the workers; the chief gets `chief_grace` seconds to exit after them and
    is terminated otherwise (keras-tuner's chief may not exit on its own).
    """
    if overwrite and directory.exists():
        shutil.rmtree(directory)
    argv = _child_argv(child_argv)
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1",
               KERASTUNER_ORACLE_PORT=str(_free_port()))
    chief = subprocess.Popen(argv, env=dict(env, KERASTUNER_TUNER_ID="chief"))
    _wait_for_port(int(env["KERASTUNER_ORACLE_PORT"]), chief)
    procs = [subprocess.Popen(argv, env=dict(env,
                                             KERASTUNER_TUNER_ID=f"tuner{i}"))
             for i in range(workers)]
    failed = [p.wait(timeout=timeout) for p in procs]
    try:
        chief.wait(timeout=chief_grace)
    except subprocess.TimeoutExpired:
        print("chief did not exit after the workers; terminating it",
              flush=True)
        chief.terminate()
        chief.wait(timeout=30)
    if any(failed):
        raise RuntimeError(f"distributed workers exited with {failed}")


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


def _wait_for_port(port, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the chief exited before serving the oracle")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the chief did not open port {port} in {timeout} s")
