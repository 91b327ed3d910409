"""keras-tuner's oracles and tuners with AdamPlus's bookkeeping.

- The first new trial of every tuner but GridSearch evaluates the paper's
  defaults (GridSearch starts from the defaults by itself).
- Every file keras-tuner keeps (`oracle.json`, `trial.json`, the tuner's
  state, the build config) is written atomically; on a resume, a trial whose
  `trial.json` is unreadable is run again, with a warning naming the file.
- Each trial gets an `adam_plus.json` sidecar (values, seed, epochs,
  duration, history, the `variable_groups` its layer-wise values gave,
  error class, memory, versions, the worker and device that trained it),
  a progress line, and a
  step of a progress display over the whole search (elapsed time and ETA).
"""

import gc
import math
import os
import sys
import time
from pathlib import Path

import keras
import keras_tuner
from keras_tuner import oracles
from keras_tuner.engine.metrics_tracking import infer_metric_direction
from keras_tuner.engine.trial import Trial, TrialStatus
from keras_tuner.src.engine import tuner_utils

from tuning import report, rundir, seeds, workers
from tuning.distributed import Leases
from tuning.errors import check_interrupt, command, quoted
from tuning.hypermodel import Diverged
from tuning.report import epochs_text
from tuning.search_space import format_value, modes_text

SIDECAR = rundir.SIDECAR
ORACLES = {
    "random": oracles.RandomSearchOracle,
    "bayesian": oracles.BayesianOptimizationOracle,
    "hyperband": oracles.HyperbandOracle,
    "grid": oracles.GridSearchOracle,
}


class _DefaultsFirst:
    """Oracle mixin: the first new trial evaluates the default values."""

    def _random_values(self):
        hps = self.get_space()
        defaults = {hp.name: hp.default for hp in hps.space
                    if hps.is_active(hp)}
        if not self._duplicate(defaults):
            return defaults
        return super()._random_values()


class _AtomicState:
    """Oracle mixin: atomic `oracle.json` and `trial.json`; unreadable trials
    are run again on a resume."""

    def save(self):
        rundir.write_json(self._get_oracle_fname(), self.get_state(),
                          indent=None)

    def _save_trial(self, trial):
        rundir.write_json(Path(self._get_trial_dir(trial.trial_id))
                          / "trial.json", trial.get_state(), indent=None)

    def save_all(self):
        """Saves every trial and the oracle; keras-tuner stops a search that
        failed too often inside `end_trial`, before saving the last trial."""
        for trial in self.trials.values():
            self._save_trial(trial)
        self.save()

    def reload(self):
        path = Path(self._get_oracle_fname())
        # The finished trials' own files are intact: `report` reads them.
        remedy = (f"the trials done are kept: `{command()} report "
                  f"{quoted(path.parent.parent)}` shows them; rerun with "
                  "--overwrite to start afresh, or choose another "
                  "--directory")
        damaged = rundir.DamagedFile(
            f"{quoted(path)} is not a search's oracle state (damaged, or from "
            f"another program); {remedy}")
        if not isinstance(rundir.read_json_strict(path, remedy), dict):
            raise damaged
        rerun = []
        for path in sorted(Path(self._project_dir).glob("trial_*/trial.json")):
            state = rundir.read_json(path, "its trial is run again")
            if state is not None and not _is_trial(state):
                print(f"warning: {quoted(path)} is not a trial's state; its "
                      "trial is run again", file=sys.stderr, flush=True)
            if not _is_trial(state):
                rerun.append(self._recover(path))
        try:
            super().reload()
        except (KeyError, TypeError, ValueError, AttributeError,
                RuntimeError):  # keras-tuner wraps a KeyError in one
            raise damaged from None
        for trial_id in rerun:
            if trial_id in self.end_order:
                self.end_order.remove(trial_id)
            if trial_id not in self._retry_queue:
                self._retry_queue.append(trial_id)
        # A kill between a new trial's trial.json and oracle.json leaves a
        # RUNNING trial the oracle does not list: it would never run.
        for trial_id, trial in self.trials.items():
            if trial.status == TrialStatus.RUNNING and (
                trial_id not in self.end_order
                and trial_id not in self._retry_queue
            ):
                self._retry_queue.append(trial_id)

    def _recover(self, path):
        """Rewrites an unreadable trial.json as a trial to run again.

        Its values come from our sidecar (written when the trial started);
        without one (a trial that never started, or an older version's),
        from the oracle's next draw.
        """
        trial_id = path.parent.name[len("trial_"):]
        side = rundir.read_json(path.parent / SIDECAR,
                                "its values are drawn again") or {}
        values = side.get("values") or self._random_values() or {}
        hps = self.hyperparameters.copy()
        hps.values = values
        trial = Trial(hps, trial_id=trial_id, status=TrialStatus.RUNNING)
        rundir.write_json(path, trial.get_state(), indent=None)
        return trial_id


class WriteFailed(rundir.DirectoryUnusable, keras_tuner.errors.FatalError):
    """A file of a trial cannot be written: the search stops (keras-tuner
    would count it as a failed trial and go on)."""


def _write_or_stop(path, obj, indent=1):
    """`rundir.write_json`, whose failure inside a trial stops the search."""
    try:
        rundir.write_json(path, obj, indent=indent)
    except rundir.DirectoryUnusable as err:
        raise WriteFailed(str(err)) from None


def _is_trial(state):
    """Whether `state` (a trial.json's JSON) has what a trial needs."""
    return isinstance(state, dict) and isinstance(
        state.get("hyperparameters"), dict) and isinstance(
        state["hyperparameters"].get("values"), dict) and isinstance(
        state.get("trial_id"), str) and "status" in state


def oracle_class(name):
    """keras-tuner's oracle `name` with our mixins."""
    if name not in ORACLES:
        raise ValueError(
            f"Argument `tuner` must be one of {', '.join(ORACLES)}. "
            f"Received: tuner={name!r}"
        )
    mixins = (_AtomicState, Leases) if name == "grid" else (
        _AtomicState, Leases, _DefaultsFirst)
    base = ORACLES[name]
    return type(f"AdamPlus{base.__name__}", (*mixins, base), {})


class _Bookkeeping:
    """Tuner mixin: sidecar, progress, atomic state and failure records."""

    progress = None  # a `tuning.progress` display over the search, or None
    running = None  # the id of the trial this process trains, or None

    def run_trial(self, trial, *args, **kwargs):
        start = time.time()
        hypermodel = self.hypermodel
        hypermodel.last_history, hypermodel.last_epochs = {}, None
        hypermodel.last_variable_groups = None
        record = {"trial_id": trial.trial_id,
                  "values": dict(trial.hyperparameters.values),
                  "seed": hypermodel.seed, "backend": keras.backend.backend(),
                  "versions": report.versions(), "status": "RUNNING",
                  "worker": workers.worker_label(),
                  "device": workers.device_label()}
        path = Path(self.get_trial_dir(trial.trial_id)) / SIDECAR
        _write_or_stop(path, record)
        status, error = "INTERRUPTED", None
        self.running = trial.trial_id
        try:
            result = super().run_trial(trial, *args, **kwargs)
            status = "COMPLETED"
            return result
        except OSError as err:  # keras-tuner's checkpoint (h5py), ours
            raise WriteFailed(str(rundir.unusable(
                err.filename or self.get_trial_dir(trial.trial_id), err))
            ) from None
        except Exception as err:
            status, error = ("DIVERGED" if isinstance(err, Diverged)
                             else "FAILED"), err
            raise
        finally:
            self.running = None
            record.update(
                status=status,
                epochs=hypermodel.last_epochs,
                duration_s=round(time.time() - start, 3),
                history=hypermodel.last_history,
                # What best.json needs of layer_decay/head_multiplier.
                variable_groups=hypermodel.last_variable_groups,
                error=None if error is None else str(error)[:500],
                error_type=None if error is None else type(error).__name__,
                rss_mb=_rss_mb(),
            )
            _write_or_stop(path, record)

    def _build_and_fit_model(self, trial, *args, **kwargs):
        # keras-tuner's, with the build config written atomically.
        hp = trial.hyperparameters
        model = self._try_build(hp)
        results = self.hypermodel.fit(hp, model, *args, **kwargs)
        _write_or_stop(self._get_build_config_fname(trial.trial_id),
                       model.get_build_config(), indent=None)
        tuner_utils.validate_trial_results(
            results, self.oracle.objective, "HyperModel.fit()")
        return results

    def save(self):
        if not self._is_worker():
            self.oracle.save()
        rundir.write_json(self._get_tuner_fname(), self.get_state(),
                          indent=None)

    def reload(self):
        # The tuner's own state is empty: only the oracle has one to read.
        if not self._is_worker():
            self.oracle.reload()

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        gc.collect()
        check_interrupt()
        done = self.oracle.get_trial(trial.trial_id)
        values = self.hypermodel.space.optimizer_kwargs(
            {k: v for k, v in done.hyperparameters.values.items()
             if not k.startswith("tuner/")})
        shown = " ".join([
            *(f"{k}={format_value(k, v)}" for k, v in values.items()
              if isinstance(v, float)),
            modes_text(values, "inverse_sqrt"
                       if self.hypermodel.inverse_sqrt_lr else None)]).strip()
        objective = self.oracle.objective.name
        epochs = self.hypermodel.last_epochs
        if done.score is not None and math.isfinite(done.score):
            final = report.final_value(
                {"history": self.hypermodel.last_history}, objective)
            result = (f"{objective}={done.score:.4f} at its best epoch"
                      + ("" if final is None else f", {final:.4f} at its last")
                      + f" ({epochs_text(epochs)})")
        else:
            side = rundir.read_json(
                Path(self.get_trial_dir(trial.trial_id)) / SIDECAR) or {}
            result = side.get("status", str(done.status))
            if side.get("error_type") not in (None, "Diverged"):
                result += (f" ({side['error_type']}: "
                           f"{report.one_line(side['error'], 200)})")
        print(f"trial {trial.trial_id}: {shown} -> {result}", flush=True)
        if self.progress is not None:
            self.progress.add(1)


class AdamPlusTuner(_Bookkeeping, keras_tuner.Tuner):
    """A keras-tuner `Tuner` with AdamPlus bookkeeping."""


class AdamPlusHyperband(_Bookkeeping, keras_tuner.Hyperband):
    """keras-tuner's Hyperband (epochs per bracket) with bookkeeping."""

    def __init__(self, oracle, hypermodel, **kwargs):
        # Hyperband.__init__ only builds its oracle; ours is built already.
        keras_tuner.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel,
                                   **kwargs)


def make_tuner(hypermodel, tuner="random", max_trials=10, objective="val_loss",
               direction=None, directory="tuning_runs", project_name=None,
               seed=0, overwrite=False, max_epochs=None):
    """Builds an `AdamPlusTuner` (or Hyperband) around `hypermodel`.

    `direction` ("min" or "max") defaults to keras-tuner's inference from
    the objective's name (`keras_tuner.Objective`). The oracle's seed is
    `tuning.seeds.derive(seed, "oracle")`: seed 0 seeds it too, and
    neighbouring seeds give unrelated searches.
    """
    objective = keras_tuner.Objective(
        objective, direction or infer_direction(objective))
    common = dict(objective=objective,
                  seed=seeds.derive(seed, "oracle"),
                  max_consecutive_failed_trials=max(3, max_trials))
    if tuner == "hyperband":
        oracle = oracle_class(tuner)(
            max_epochs=max_epochs or hypermodel.epochs, factor=3,
            hyperband_iterations=1, **common,
        )
        cls = AdamPlusHyperband
    else:
        oracle = oracle_class(tuner)(max_trials=max_trials, **common)
        cls = AdamPlusTuner
    return cls(oracle=oracle, hypermodel=hypermodel, directory=str(directory),
               project_name=project_name or hypermodel.name,
               overwrite=overwrite)


def infer_direction(objective):
    """"min" or "max" for a metric name, by keras-tuner's own rules."""
    direction = infer_metric_direction(objective)
    if direction is None:
        raise ValueError(
            f"The direction of objective {objective!r} cannot be inferred; "
            "pass direction='min' or 'max' (--direction)"
        )
    return direction


def grid_points(space):
    """How many points GridSearch visits in `space` in all: the product of
    each hyperparameter's values, a conditional one (weight_decay) counted
    under the parent values that activate it."""
    hp = keras_tuner.HyperParameters()
    hp.values["weight_decay_mode"] = "l2"  # declares its child too
    space.declare(hp)
    children = {}
    for h in hp.space:
        for condition in h.conditions:
            children.setdefault(condition.name, []).append(
                (condition.values, len(list(h.values))))
    points = 1
    for h in hp.space:
        if h.conditions:
            continue
        values = list(h.values)
        count = len(values)
        for active, n in children.get(h.name, ()):
            count += sum(1 for v in values if v in active) * (n - 1)
        points *= count
    return points


def planned_trials(oracle):
    """How many trials the search runs in all (Hyperband: its brackets)."""
    if isinstance(oracle, oracles.HyperbandOracle):
        per_iteration = sum(
            oracle._get_size(bracket, round_num)
            for bracket in range(oracle._get_num_brackets())
            for round_num in range(oracle._get_num_rounds(bracket))
        )
        return per_iteration * oracle.hyperband_iterations
    return oracle.max_trials


def _rss_mb():
    """Resident memory of this process now, in MiB (Linux), else peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                     / 1024, 1)

