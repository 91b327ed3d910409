"""The keras-tuner sweep: space, every tuner, failures, reports, resume."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pytest

from keras_adam_plus import AdamPlus
from tuning import SearchSpace, sweep
from tuning.cli import main as cli_main
from tuning.search_space import PAPER_DEFAULTS

QUICK = dict(subset=300, epochs=1, plots=False)


def once_on(backend):
    """Runs a backend-independent test on one backend only.

    Process-level machinery (keras-tuner's oracle files, its gRPC chief and
    workers, locks, signals) and the bookkeeping around trials are the same
    whatever Keras backend trains them: such tests run once, each on one
    backend (spread over the three), to keep CI under its budget.
    """
    return pytest.mark.skipif(
        keras.backend.backend() != backend,
        reason=f"backend-independent machinery, tested once, on {backend}, "
        "to keep CI under its budget",
    )


@pytest.mark.quick
def test_default_values_are_the_papers_exactly():
    hp = keras_tuner.HyperParameters()
    space = SearchSpace()
    kwargs = space.optimizer_kwargs(space.declare(hp))
    assert kwargs == PAPER_DEFAULTS
    assert set(hp.values) == {"learning_rate", "one_minus_beta_1",
                              "one_minus_beta_2", "epsilon"}


@pytest.mark.quick
def test_tune_a_subset_and_fix_the_rest():
    hp = keras_tuner.HyperParameters()
    space = SearchSpace(tune=("learning_rate", "beta_2"),
                        fixed={"epsilon": 1e-6, "epsilon_mode": "hat"})
    kwargs = space.optimizer_kwargs(space.declare(hp))
    assert set(hp.values) == {"learning_rate", "one_minus_beta_2"}
    assert kwargs["epsilon"] == 1e-6 and kwargs["epsilon_mode"] == "hat"
    AdamPlus(**kwargs)


@pytest.mark.quick
def test_priors_are_log_uniform_in_one_minus_beta():
    hp = keras_tuner.HyperParameters()
    SearchSpace().declare(hp)
    prior = {p.name: p for p in hp.space}["one_minus_beta_2"]
    draws = np.array([prior.random_sample(seed) for seed in range(4000)])
    logs = np.log10(draws)  # 1 - beta_2 in [1e-4, 1e-1]
    assert logs.min() >= -4 and logs.max() <= -1
    # Uniform on [-4, -1]: each decade holds a third of the draws.
    for low in (-4, -3, -2):
        share = np.mean((logs >= low) & (logs < low + 1))
        assert abs(share - 1 / 3) < 0.04


@pytest.mark.quick
def test_invalid_space_is_refused():
    with pytest.raises(ValueError, match="Argument `tune` must name only"):
        SearchSpace(tune=("momentum",))
    with pytest.raises(ValueError, match="Argument `ranges` must map"):
        SearchSpace(ranges={"epsilon": (1e-3, 1e-9)})


# Each backend runs two of the four tuners (every tuner runs on at least
# one backend): the oracles are backend-independent, the training is not.
TUNERS_ON = {"tensorflow": ("grid", "random"), "jax": ("bayesian", "hyperband"),
             "torch": ("hyperband", "random")}


@pytest.mark.parametrize("tuner", [
    pytest.param(t, marks=() if t in TUNERS_ON[keras.backend.backend()]
                 else pytest.mark.skip(reason="tuner x backend pairs: "
                                       "this tuner runs on another backend"))
    for t in ["random", "bayesian", "hyperband", "grid"]])
def test_every_tuner_runs_defaults_first_and_writes_outputs(tuner, tmp_path):
    space = SearchSpace(tune=("learning_rate", "beta_2"),
                        grid_steps=1 if tuner == "grid" else 0)
    result = sweep(tuner=tuner, max_trials=3, directory=tmp_path, seed=1,
                   space=space, **dict(QUICK, epochs=2))
    trials = result.trials
    assert trials and all(t["status"] == "COMPLETED" for t in trials)
    if tuner != "hyperband":
        assert len(trials) == 3
    first = trials[0]["optimizer"]
    assert math.isclose(first["learning_rate"], 1e-3, rel_tol=1e-9)
    assert math.isclose(first["beta_2"], 0.999, rel_tol=1e-12)
    assert trials[0]["is_default"]
    assert result.default_score == trials[0]["score"]
    assert result.best_score == min(t["score"] for t in trials)
    for name in ("trials.csv", "trials.json", "best.json", "summary.txt"):
        assert (tmp_path / name).is_file()
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == result.best_config
    AdamPlus(**best)
    assert all(t["seed"] == 1 and t["duration_s"] > 0 for t in trials)
    if tuner == "grid":  # was silent about the 17 points never visited
        assert ("grid: 3 of 20 points visited; --max-trials stopped it "
                "before the other 17") in (tmp_path / "summary.txt").read_text()


@once_on("jax")
def test_diverging_trials_fail_and_are_never_best(tmp_path):
    # alpha up to 1e30 overflows the ReLU MLP: loss becomes NaN.
    space = SearchSpace(tune=("learning_rate",),
                        ranges={"learning_rate": (1e-3, 1e30)})
    result = sweep(max_trials=6, directory=tmp_path, seed=3, space=space,
                   **QUICK)
    statuses = [t["status"] for t in result.trials]
    assert len(statuses) == 6
    assert "DIVERGED" in statuses and "COMPLETED" in statuses
    assert set(statuses) == {"DIVERGED", "COMPLETED"}
    failed = [t for t in result.trials if t["status"] == "DIVERGED"]
    assert all("non-finite" in t["error"] for t in failed)
    assert all(t["error_type"] == "Diverged" for t in failed)
    assert all(t["score"] is None for t in failed)
    assert min(t["optimizer"]["learning_rate"] for t in failed) > 1.0
    assert result.best_config["learning_rate"] < 1.0
    text = (tmp_path / "summary.txt").read_text()
    assert "diverged (NaN/Inf loss) trials span:" in text
    assert "failed with an error" not in text
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert sum(",DIVERGED," in r for r in rows) == len(failed)
    # Strict JSON: a diverged trial's NaN is the string "NaN", never a
    # bare NaN (was); it reads back as a float.
    from tuning import rundir

    def bare(name):
        raise ValueError(f"bare {name}")

    for path in [tmp_path / "trials.json",
                 *tmp_path.glob("*/trial_*/adam_plus.json")]:
        json.loads(path.read_text(), parse_constant=bare)
    histories = [t["history"]["loss"] for t in rundir.read_json(
        tmp_path / "trials.json")["trials"] if t["status"] == "DIVERGED"]
    assert any(not math.isfinite(v) for h in histories for v in h)


def test_report_rebuilds_tables_and_plots(tmp_path, capsys):
    sweep(max_trials=2, directory=tmp_path, **QUICK)
    for name in ("trials.csv", "best.json"):
        (tmp_path / name).unlink()
    assert cli_main(["report", str(tmp_path)]) == 0
    for name in ("trials.csv", "trials.json", "best.json", "scores.png",
                 "learning_curves.png", "default_vs_best.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "paper default" in capsys.readouterr().out


@pytest.mark.parametrize("trials", [
    10, pytest.param(20, marks=pytest.mark.slow)])
def test_memory_does_not_grow_over_trials(trials, tmp_path):
    result = sweep(max_trials=trials, directory=tmp_path, **QUICK)
    rss = [t["rss_mb"] for t in result.trials]
    growth = rss[-1] - rss[4]
    print(f"RSS after trial 5: {rss[4]} MiB, after trial {trials}: "
          f"{rss[-1]} MiB, peak {max(rss)} MiB")
    assert len(rss) == trials
    # Measured: a plain loop of build/compile/fit/clear_session grows by
    # ~4.2 MiB per fit under TensorFlow 2.21 (keras.optimizers.Adam too, no
    # tuner involved): TF's own caches. JAX and torch stay flat.
    per_trial = 6.0 if keras.backend.backend() == "tensorflow" else 1.5
    assert growth < (trials - 5) * per_trial, rss


def _cli(directory, *extra):
    return [sys.executable, "-m", "tuning", "--directory", str(directory),
            "--subset", "400", "--no-plots", *extra]


def _trial_states(directory):
    states = {}
    for path in Path(directory).glob("*/trial_*/trial.json"):
        trial = json.loads(path.read_text())
        states[trial["trial_id"]] = trial
    return states


_ONCE = once_on("tensorflow")


@_ONCE
def test_resume_after_sigkill_loses_no_trial(tmp_path):
    cmd = _cli(tmp_path, "--max-trials", "4", "--epochs", "6")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    before = {}
    while time.time() < deadline and proc.poll() is None:
        states = _trial_states(tmp_path)
        done = {k: v for k, v in states.items() if v["status"] == "COMPLETED"}
        if len(done) >= 2 and len(states) > len(done):
            before = done
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(before) >= 2
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = _trial_states(tmp_path)
    assert sorted(t["status"] for t in after.values()) == ["COMPLETED"] * 4
    for trial_id, trial in before.items():
        assert after[trial_id]["score"] == trial["score"]
        assert (after[trial_id]["hyperparameters"]["values"]
                == trial["hyperparameters"]["values"])
    table = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert len(table) == 4


def _read_trials(directory):
    """keras-tuner's trial.json files of a search, by trial id."""
    return {p.parent.name[len("trial_"):]: json.loads(p.read_text())
            for p in Path(directory).glob("*/trial_*/trial.json")}


@once_on("torch")
def test_hyperband_continues_trials_end_to_end(tmp_path):
    # max_epochs 3, factor 3: a bracket of three 1-epoch trials whose best
    # continues to 3 epochs from its checkpoint (optimizer state included),
    # then a bracket of two 3-epoch trials.
    result = sweep(tuner="hyperband", epochs=3, directory=tmp_path,
                   space=SearchSpace(tune=("learning_rate",)), subset=300,
                   plots=False, verbose=0)
    assert [t["status"] for t in result.trials] == ["COMPLETED"] * 6
    assert [t["epochs"] for t in result.trials] == [1, 1, 1, 3, 3, 3]
    states = _read_trials(tmp_path)
    continued = [s for s in states.values()
                 if "tuner/trial_id" in s["hyperparameters"]["values"]]
    assert len(continued) == 1
    child = next(t for t in result.trials
                 if t["trial_id"] == continued[0]["trial_id"])
    parent_id = continued[0]["hyperparameters"]["values"]["tuner/trial_id"]
    parent = next(t for t in result.trials if t["trial_id"] == parent_id)
    assert child["optimizer"] == parent["optimizer"]
    # It trained epochs 2 and 3 from where its parent stopped.
    assert len(child["history"]["loss"]) == 2
    assert child["history"]["loss"][0] < parent["history"]["loss"][0]
    # Best and defaults compared at 3 epochs only.
    assert result.epochs == 3
    assert result.best_score == min(t["score"] for t in result.trials
                                    if t["epochs"] == 3)


@once_on("torch")
def test_a_trial_that_fails_for_a_bug_is_not_diverged(tmp_path, monkeypatch):
    from tuning.hypermodel import AdamPlusHyperModel
    from tuning.sweep import SweepFailed

    fit, calls = AdamPlusHyperModel.fit, []

    def buggy_second_fit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom: a bug\nsecond line")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(AdamPlusHyperModel, "fit", buggy_second_fit)
    result = sweep(max_trials=3, directory=tmp_path, verbose=0, **QUICK)
    assert [t["status"] for t in result.trials] == [
        "COMPLETED", "FAILED", "COMPLETED"]
    failed = result.trials[1]
    assert (failed["error_type"], failed["error"]) == (
        "RuntimeError", "boom: a bug\nsecond line")
    text = (tmp_path / "summary.txt").read_text()
    assert "trials: 2 COMPLETED, 1 FAILED" in text
    assert ("trial 1 failed with an error (not divergence): RuntimeError: "
            "boom: a bug second line") in text
    assert "diverged" not in text
    rows = (tmp_path / "trials.csv").read_text().splitlines()
    assert ",FAILED," in rows[2]
    # error_type and error, then where it ran (worker, device).
    assert rows[2].endswith(",RuntimeError,boom: a bug second line,local,"
                            "cpu")
    # Every trial failing stops with one line, the first error, the tables
    # written, for any number of trials (was: exit 0 and no best below 3).
    errors = iter(range(10))

    def fails(*args, **kwargs):
        raise ValueError(f"failure {next(errors)}")

    monkeypatch.setattr(AdamPlusHyperModel, "fit", fails)
    for n in (1, 3):
        errors = iter(range(10))
        with pytest.raises(SweepFailed) as err:
            sweep(max_trials=n, directory=tmp_path / f"all{n}", verbose=0,
                  **QUICK)
        assert str(err.value) == (
            f"all {n} trials failed, the first with ValueError: failure 0; "
            f"see {tmp_path / f'all{n}' / 'trials.csv'}")
        rows = (tmp_path / f"all{n}" / "trials.csv").read_text().splitlines()
        assert [r.split(",")[1] for r in rows[1:]] == ["FAILED"] * n


def _trial(trial_id, score, epochs, learning_rate=1e-3, beta_2=0.999,
           status="COMPLETED"):
    optimizer = {"learning_rate": learning_rate, "beta_1": 0.9,
                 "beta_2": beta_2, "epsilon": 1e-8}
    return {"trial_id": trial_id, "status": status, "score": score,
            "epochs": epochs, "optimizer": optimizer, "hyperparameters": {},
            "seed": 0, "duration_s": 2.0, "history": {}, "error_type": None,
            "error": None, "rss_mb": 1.0,
            "is_default": optimizer == PAPER_DEFAULTS}


# Hyperband-like: the lowest score overall is a 1-epoch trial; the paper's
# defaults ran 1 epoch only.
BUDGETS = [_trial("0", 0.50, 1), _trial("1", 0.25, 1, learning_rate=0.01),
           _trial("2", 0.45, 3, learning_rate=0.003),
           _trial("3", 0.30, 3, learning_rate=0.02, beta_2=0.9996)]


@pytest.mark.parametrize("direction,best_id", [("min", "3"), ("max", "2")])
def test_best_is_chosen_in_the_objectives_direction_at_one_budget(
        direction, best_id, tmp_path):
    from tuning import report

    settings = {"objective": "val_loss", "direction": direction,
                "benchmark": "digits", "tuner": "hyperband", "data": "d"}
    result = report.sweep_result(tmp_path, BUDGETS, settings)
    best = next(t for t in BUDGETS if t["trial_id"] == best_id)
    assert (result.best_config, result.best_score, result.epochs) == (
        best["optimizer"], best["score"], 3)
    assert result.default_score is None  # not run at 3 epochs
    assert "continued trial" not in report.summary(result, settings)
    best["continued_from"] = "0"  # Hyperband carried its weights on
    lines = report.summary(result, settings).splitlines()
    del best["continued_from"]
    assert ("the best trial continued trial 0's weights (Hyperband): "
            "best.json rebuilds its optimizer, but training from scratch "
            "will not give its score exactly; --confirm retrains it from "
            "scratch") in lines
    lines = [line for line in lines if "continued" not in line]
    assert lines[1] == (f"objective val_loss, "
                        f"{dict(min='minimised', max='maximised')[direction]}"
                        "; score = its value at a trial's best epoch")
    assert lines[-2].split() == ["val_loss,", "3", "epochs",
                                 f"{best['score']:.4f}", "not", "run"]
    assert lines[-1] == ("paper default: 0.5000 after 1 epoch only (not "
                         "comparable with 3 epochs)")


def test_summary_keeps_betas_apart_from_one(tmp_path):
    from tuning import report

    trials = [_trial("0", 0.5, 2),
              _trial("1", 0.2, 2, learning_rate=0.01, beta_2=0.9996),
              _trial("2", None, 2, learning_rate=3.0, beta_2=0.99961,
                     status="DIVERGED"),
              _trial("3", None, 2, learning_rate=9.0, beta_2=0.99996,
                     status="DIVERGED")]
    settings = {"objective": "val_loss", "direction": "min"}
    text = report.summary(report.sweep_result(tmp_path, trials, settings),
                          settings)
    assert "beta_2                         0.9996          0.999" in text
    assert "  beta_2: 0.99961 .. 0.99996" in text
    assert "  learning_rate: 3 .. 9" in text
    assert "val_loss, 2 epochs             0.2000         0.5000" in text


def test_the_final_epoch_is_shown_beside_the_best_and_a_gap_is_named(
        tmp_path):
    # Was: only the best epoch's value (0.041 at epoch 6 hid 0.083 at 8).
    from tuning import report

    trials = [_trial("0", 0.50, 2), _trial("1", 0.40, 2, learning_rate=0.01),
              _trial("2", 0.45, 2, learning_rate=0.02)]
    finals = {"0": 0.52, "1": 0.60, "2": 0.45}
    for t in trials:
        t.update(history={"val_loss": [t["score"], finals[t["trial_id"]]]},
                 worker=None, device=None)
        t["final"] = report.final_value(t, "val_loss")
    settings = {"objective": "val_loss", "direction": "min"}
    text = report.summary(report.sweep_result(tmp_path, trials, settings),
                          settings)
    assert ("the best trial's val_loss at its last epoch, 0.6000, is 0.2000 "
            "from its best epoch's 0.4000: more than the trials' spread "
            "(0.0500, sample std); its score is optimistic: --confirm "
            "retrains it over new seeds") in text
    report._write_csv(tmp_path / "t.csv", trials, "val_loss")
    rows = [r.split(",") for r in (tmp_path / "t.csv").read_text().split()]
    assert rows[0][3:5] == ["val_loss_at_best_epoch",
                            "val_loss_at_final_epoch"]
    assert [r[3:5] for r in rows[1:]] == [["0.5", "0.52"], ["0.4", "0.6"],
                                          ["0.45", "0.45"]]
    finals["1"] = 0.43  # within the spread: nothing to say
    trials[1]["history"]["val_loss"][-1] = 0.43
    trials[1]["final"] = 0.43
    assert "last epoch" not in report.summary(
        report.sweep_result(tmp_path, trials, settings), settings)


def test_plots_are_titled_mark_the_best_and_read_in_grey(tmp_path,
                                                        monkeypatch):
    # Was: no titles, the best trial unmarked, legends with the learning
    # rate only, series told apart by colour alone.
    from tuning import plots, report, rundir

    trials = [_trial("0", 0.50, 2), _trial("1", 0.40, 2, learning_rate=0.01),
              _trial("2", 0.45, 2, learning_rate=0.02, beta_2=0.9996)]
    for t in trials:
        t["history"] = {"loss": [0.9, 0.6], "val_loss": [t["score"], 0.7]}
    trials[1]["optimizer"]["amsgrad"] = True
    best, default = report.choose(trials, "min")
    figures = {}
    monkeypatch.setattr(rundir, "write_figure",
                        lambda fig, path, **k: figures.update(
                            {path.name: fig}))
    monkeypatch.setattr(plots.plt, "close", lambda fig: None)
    plots.draw_all(tmp_path, trials, best, default,
                   {"objective": "val_loss"}, "min")
    scores = figures["scores.png"]
    assert scores._suptitle.get_text() == (
        "val_loss of each trial at its best epoch (lower is better)")
    legend = [t.get_text() for t in scores.axes[0].get_legend().get_texts()]
    assert legend == ["completed, 2 epochs", "paper default",
                      "best: trial 1"]
    curves = figures["learning_curves.png"].axes[0]
    assert curves.get_title() == "val_loss per epoch, the best 3 trials"
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [
        "trial 1 (best): lr 0.01, b1 0.9, b2 0.999, eps 1e-08, amsgrad True",
        "trial 2: lr 0.02, b1 0.9, b2 0.9996, eps 1e-08",
        "trial 0: lr 0.001, b1 0.9, b2 0.999, eps 1e-08"]
    styles = {(line.get_marker(), line.get_linestyle())
              for line in curves.get_lines()}
    assert len(styles) == 3  # apart without colour
    versus = figures["default_vs_best.png"].axes[0]
    assert versus.get_title().startswith("training (dashed) and validation")
    assert len({(line.get_marker(), line.get_linestyle())
                for line in versus.get_lines()}) == 4


def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    # Was: Keras's Progbar wrote \r, \b and colour codes into logs.
    from tuning import progress

    clock = iter([100.0, 130.0, 190.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    display = progress.make(3, "trial")  # capsys: stdout is no terminal
    display.add(1)
    display.add(1)
    assert capsys.readouterr().out == (
        "progress: 1/3 trials, 0:00:30 elapsed, ETA 0:01:00\n"
        "progress: 2/3 trials, 0:01:30 elapsed, ETA 0:00:45\n")


def test_confirm_calls_fixed_defaults_what_they_are():
    # Was: a space with a fixed epsilon_mode="hat" (API) compared its best
    # with "paper default", which the paper's is not.
    confirmation = importlib.import_module("tuning.confirm")
    trials = [_trial("1", 0.4, 2, learning_rate=0.01)]
    trials[0]["is_default"] = False
    labels = [[c["label"] for c in confirmation._configs(
        trials, "min", 1, {"space": {"fixed": fixed}})]
        for fixed in ({}, {"epsilon_mode": "hat"})]
    assert labels == [["trial 1", "paper default"],
                      ["trial 1", "space default"]]


def test_grid_points_count_every_combination():
    from tuning.tuners import grid_points

    # 1 - beta_2 in [1e-4, 0.1]: 4 decades' ends; alpha in [1e-5, 0.1]: 5.
    assert grid_points(SearchSpace(tune=("learning_rate", "beta_2"),
                                   grid_steps=1)) == 5 * 4
    # amsgrad 2 x epsilon_mode 2 x (no decay + 2 modes x 10 decays).
    assert grid_points(SearchSpace(tune=("learning_rate",), modes=True,
                                   grid_steps=1)) == 5 * 2 * 2 * 21


@pytest.mark.parametrize("modes,default", [
    ({}, True),
    ({"amsgrad": False, "epsilon_mode": "paper"}, True),
    ({"amsgrad": True}, False),
    ({"epsilon_mode": "hat"}, False),
    # Was: weight decay was not compared, so this counted as the default.
    ({"weight_decay_mode": "decoupled", "weight_decay": 1e-4}, False),
    ({"weight_decay_mode": "l2", "weight_decay": 1e-4}, False),
    ({"nesterov": True}, False),
])
def test_paper_default_means_every_mode_at_its_default(modes, default):
    from tuning.search_space import is_paper_default

    assert is_paper_default({**PAPER_DEFAULTS, **modes}) is default


def test_summary_and_csv_show_every_mode_and_the_schedule(tmp_path):
    from tuning import report
    from tuning.search_space import modes_text

    tuned = _trial("1", 0.2, 2, learning_rate=0.01)
    tuned["optimizer"].update(amsgrad=True, epsilon_mode="hat",
                              weight_decay_mode="l2", weight_decay=1e-4)
    trials = [_trial("0", 0.5, 2), tuned]
    for t in trials:
        t.update(schedule="inverse_sqrt", worker=None, device=None)
        t["optimizer"].update(amsgrad=t["optimizer"].get("amsgrad", False))
    settings = {"objective": "val_loss", "direction": "min"}
    result = report.sweep_result(tmp_path, trials, settings)
    # best.json's schedule is exactly what Keras serializes.
    from keras_adam_plus import InverseSqrtDecay

    assert result.best_config["learning_rate"] == (
        keras.saving.serialize_keras_object(InverseSqrtDecay(0.01)))
    assert result.best_config["weight_decay_mode"] == "l2"
    lines = report.summary(result, settings).splitlines()
    for row in (["amsgrad", "True", "False"], ["epsilon_mode", "hat", "paper"],
                ["weight_decay", "0.0001", "None"],
                ["weight_decay_mode", "l2", "-"],
                ["learning_rate", "schedule", "inverse_sqrt", "inverse_sqrt"]):
        assert row in [line.split() for line in lines]
    assert modes_text(tuned["optimizer"], "inverse_sqrt") == (
        "amsgrad=True epsilon_mode=hat weight_decay_mode=l2 "
        "schedule=inverse_sqrt")  # the trial line's modes
    report._write_csv(tmp_path / "t.csv", trials, "val_loss")
    header, first, second = (tmp_path / "t.csv").read_text().splitlines()
    assert header.split(",")[5:13] == [
        "amsgrad", "beta_1", "beta_2", "epsilon", "epsilon_mode",
        "learning_rate", "weight_decay", "weight_decay_mode"]
    assert second.split(",")[5:14] == [
        "True", "0.9", "0.999", "1e-08", "hat", "0.01", "0.0001", "l2",
        "inverse_sqrt"]


@once_on("jax")
def test_max_trials_may_grow_other_settings_may_not(tmp_path):
    from tuning.rundir import SettingsMismatch

    first = sweep(max_trials=2, directory=tmp_path, verbose=0, **QUICK)
    again = sweep(max_trials=3, directory=tmp_path, verbose=0, **QUICK)
    assert len(again.trials) == 3
    assert again.trials[:2] == first.trials
    with pytest.raises(SettingsMismatch, match=(
        r"holds a search with other settings: epochs 1 there, 2 now; "
        r"max_trials 3 there, 2 now \(it may only grow\)\. Rerun with "
        r"--overwrite")):
        sweep(max_trials=2, directory=tmp_path, verbose=0,
              **dict(QUICK, epochs=2))
    # --overwrite removes what the search wrote (its manifest), no more: a
    # user's own PNG and folder beside it stay (were deleted).
    (tmp_path / "mine.png").write_text("user's")
    (tmp_path / "confirm_runs").mkdir()  # a name the search could write
    (tmp_path / "confirm_runs" / "notes.txt").write_text("user's")
    assert (tmp_path / "trials.csv").exists()
    fresh = sweep(max_trials=1, directory=tmp_path, verbose=0, overwrite=True,
                  **dict(QUICK, epochs=2))
    assert [t["epochs"] for t in fresh.trials] == [2]
    assert (tmp_path / "mine.png").read_text() == "user's"
    assert (tmp_path / "confirm_runs" / "notes.txt").read_text() == "user's"


def test_overwrite_refuses_a_folder_no_search_wrote(tmp_path):
    from tuning.rundir import DirectoryUnusable

    (tmp_path / "photo.png").write_text("user's")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DirectoryUnusable) as err:
        sweep(max_trials=1, directory=tmp_path, overwrite=True, **QUICK)
    assert str(err.value) == (
        f"{tmp_path} holds files that no search wrote (no settings.json): "
        "--overwrite removes only a search's files; choose another "
        "--directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "sub"]


def test_the_lock_is_exclusive_and_reentrant(tmp_path):
    from tuning import rundir

    with rundir.lock(tmp_path / "run"):
        with rundir.lock(tmp_path / "run"):  # sweep inside the CLI's lock
            pass
        code = ("import sys; from tuning import rundir\n"
                "try:\n"
                f"    with rundir.lock({str(tmp_path / 'run')!r}): pass\n"
                "except rundir.DirectoryBusy as err:\n"
                "    print(err)")
        out = subprocess.run([sys.executable, "-c", code], text=True,
                             capture_output=True, timeout=60)
        assert out.stdout.startswith(f"directory {tmp_path / 'run'} is in "
                                     f"use by pid {os.getpid()} on ")
    # Released, and the folder it made (holding nothing else) removed.
    assert not (tmp_path / "run").exists()


def test_report_on_a_running_search_says_running_not_interrupted(
        tmp_path):
    import fcntl

    from tuning import report, rundir

    trials = [_trial("0", 0.5, 2), _trial("1", None, None,
                                          status="RUNNING")]
    settings = {"objective": "val_loss", "direction": "min"}
    result = report.sweep_result(tmp_path, trials, settings)
    assert rundir.running(tmp_path) is None
    # Another open file description holding the lock: as another process.
    fd = os.open(tmp_path / rundir.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": 7, "host": "h", "since": "noon",
                                 "command": "tune"}).encode())
        holder = rundir.running(tmp_path)
        assert holder == "pid 7 on h since noon (tune)"
        text = report.summary(result, settings, running=holder)
        # Was: "trial 1 was interrupted; rerun the same command".
        assert ("trial 1 is running (the search runs: pid 7 on h since "
                "noon (tune))") in text
        assert "interrupted" not in text
    finally:
        os.close(fd)
    assert rundir.running(tmp_path) is None
    assert "trial 1 was interrupted" in report.summary(result, settings)


def test_json_is_strict_and_reads_both_forms(tmp_path):
    from tuning import rundir

    rundir.write_json(tmp_path / "a.json",
                      {"x": [math.nan, math.inf, -math.inf, 1.5, "paper"]})
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text) == {"x": ["NaN", "Infinity", "-Infinity", 1.5,
                                      "paper"]}
    for path in (tmp_path / "a.json", tmp_path / "old.json"):
        (tmp_path / "old.json").write_text(  # an older version's bare form
            '{"x": [NaN, Infinity, -Infinity, 1.5, "paper"]}')
        x = rundir.read_json(path)["x"]
        assert math.isnan(x[0]) and x[1:] == [math.inf, -math.inf, 1.5,
                                              "paper"]
        assert rundir.read_json_strict(path, "")["x"][1] == math.inf


def test_files_are_replaced_atomically(tmp_path, monkeypatch):
    from tuning import rundir

    path = tmp_path / "best.json"
    rundir.write_json(path, {"learning_rate": 0.001})

    def crash(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(rundir.DirectoryUnusable) as err:
        rundir.write_json(path, {"learning_rate": 0.1})
    assert str(err.value) == (
        f"cannot write {path}: killed before the rename; free space or fix "
        "permissions, then rerun the same command to resume")
    assert json.loads(path.read_text()) == {"learning_rate": 0.001}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


@_ONCE
def test_a_truncated_trial_is_named_and_run_again(tmp_path, capsys):
    from tuning import report

    first = sweep(max_trials=3, directory=tmp_path, verbose=0, **QUICK)
    path = tmp_path / "digits" / "trial_1" / "trial.json"
    text = path.read_text()
    path.write_text(text[:len(text) // 2])  # as a kill mid-write left it
    capsys.readouterr()
    trials = report.write(tmp_path, plots=False).trials
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {path} is truncated or corrupt (")
    assert warning.endswith("its trial counts as interrupted: a resume runs "
                            "it again\n")
    assert [t["status"] for t in trials] == [
        "COMPLETED", "INTERRUPTED", "COMPLETED"]
    assert trials[1]["optimizer"] == first.trials[1]["optimizer"]
    again = sweep(max_trials=3, directory=tmp_path, verbose=0, **QUICK)
    assert f"warning: {path} is truncated" in capsys.readouterr().err
    assert [t["status"] for t in again.trials] == ["COMPLETED"] * 3
    for before, after in zip(first.trials, again.trials):
        assert after["optimizer"] == before["optimizer"]
        assert after["score"] == pytest.approx(before["score"], rel=1e-5)


@once_on("jax")
def test_confirm_retrains_the_best_and_the_defaults_over_seeds(
        tmp_path, monkeypatch, capsys):
    from scipy import stats

    confirmation = importlib.import_module("tuning.confirm")  # not the
    # function `tuning.confirm`
    space = SearchSpace(tune=("learning_rate",))
    sweep(max_trials=3, directory=tmp_path, space=space, seed=2, verbose=0,
          **QUICK)
    best = json.loads((tmp_path / "best.json").read_text())
    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    top = sorted(trials, key=lambda t: t["score"])[:2]
    capsys.readouterr()
    result = confirmation.confirm(tmp_path, top=2, seeds=3, verbose=0)
    assert result["seeds"] == [3, 4, 5]
    # Says what it will run before the first run (was silent until then).
    n = len(result["configs"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"confirm: {n} configurations x 3 seeds = {3 * n} " \
        "runs of 1 epoch"
    assert len([line for line in out if line.startswith("confirm trial")
                or line.startswith("confirm paper")]) == 3 * n
    assert [c["label"] for c in result["configs"]] == [
        f"trial {t['trial_id']}" for t in top] + (
        [] if any(t["is_default"] for t in top) else ["paper default"])
    rows = (tmp_path / "confirm.csv").read_text().splitlines()
    assert rows[0].startswith("label,trial_id,is_default,seed,"
                              "val_loss_at_best_epoch,")
    assert len(rows) == 1 + 3 * len(result["configs"])
    default = next(c for c in result["configs"] if c["is_default"])
    tuned = [c for c in result["configs"] if not c["is_default"]]
    for config in result["configs"]:
        scores = np.array(config["scores"])
        assert len(scores) == 3 and len(set(scores)) == 3  # seeds differ
        assert config["mean"] == pytest.approx(scores.mean(), rel=1e-12)
        assert config["std"] == pytest.approx(scores.std(ddof=1), rel=1e-12)
    for config in tuned:  # Welch's t, written out, one-sided (lower)
        a, b = np.array(config["scores"]), np.array(default["scores"])
        va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
        t = (a.mean() - b.mean()) / np.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
        assert config["p_value"] == pytest.approx(stats.t.cdf(t, df),
                                                  rel=1e-9)
        assert config["beats_default"] == (
            config["p_value"] < 0.05 / len(tuned))
    assert json.loads((tmp_path / "best.json").read_text()) == best
    AdamPlus(**best)
    summary = (tmp_path / "summary.txt").read_text()
    assert "confirmation: 3 new seeds (3, 4, 5), 1 epoch each" in summary
    assert (tmp_path / "confirm.png").read_bytes()[:4] == b"\x89PNG"
    # Saved runs are reused: confirming again trains nothing.
    monkeypatch.setattr(confirmation, "_train", lambda *a: 1 / 0)
    assert confirmation.confirm(tmp_path, top=2, seeds=3, verbose=0,
                                plots=False)["configs"] == result["configs"]


@pytest.mark.quick
def test_welch_comparison_in_the_objectives_direction():
    from tuning.confirm import compare

    tuned, default = [0.30, 0.31, 0.29], [0.40, 0.42, 0.41]
    lower = compare(tuned, default, "min")
    assert lower["beats_default"] and lower["p_value"] < 1e-3
    assert lower["verdict"].startswith("beats the defaults beyond seed noise")
    higher = compare(tuned, default, "max")  # for accuracy, lower is worse
    assert not higher["beats_default"] and higher["p_value"] > 0.999
    noisy = compare([0.30, 0.45, 0.33], [0.40, 0.32, 0.41], "min")
    assert not noisy["beats_default"]
    assert compare([0.3, None, 0.3], default, "min") == {
        "p_value": None, "beats_default": False,
        "verdict": "diverged on some seeds: not better"}


def test_a_subset_without_validation_examples_is_refused_before_training(
        tmp_path):
    # Was: COMPLETED trials "failed with an error: None".
    from tuning.errors import TuningError

    with pytest.raises(TuningError) as err:
        sweep(subset=1, max_trials=1, epochs=1, directory=tmp_path / "run",
              plots=False, verbose=0)
    assert str(err.value) == (
        "subset 1 leaves 1 training example and no validation example to "
        "score trials on; use a subset of 5 examples or more")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_trials=0), "Argument `max_trials` must be an integer in "
     "[1, 2147483647]. Received: max_trials=0"),
    (dict(epochs=2.5), "Argument `epochs` must be an integer in "
     "[1, 2147483647]. Received: epochs=2.5"),
    (dict(seed=2**32), "Argument `seed` must be an integer in "
     "[0, 4294967295]. Received: seed=4294967296"),
    (dict(subset=float("inf")), "Argument `subset` must be a fraction in "
     "(0, 1] or a whole count in [1, 2147483647]. Received: subset=inf"),
    (dict(subset=2.5), "Argument `subset` must be a fraction in (0, 1] or a "
     "whole count in [1, 2147483647]. Received: subset=2.5"),
    (dict(subset=1e20), "Argument `subset` must be a fraction in (0, 1] or "
     "a whole count in [1, 2147483647]. Received: subset=1e+20"),
    (dict(objective="nope"), "Argument `objective` must be one of loss, "
     "accuracy, val_loss, val_accuracy (what benchmark digits logs). "
     "Received: objective='nope'"),
    (dict(direction="up"), "Argument `direction` must be None, 'min' or "
     "'max'. Received: direction='up'"),
    (dict(tuner="annealing"), "Argument `tuner` must be one of random, "
     "bayesian, hyperband, grid. Received: tuner='annealing'"),
    (dict(workers=-1), "Argument `workers` must be an integer >= 0 or "
     "'auto'. Received: workers=-1"),
])
@pytest.mark.quick
def test_sweep_refuses_invalid_arguments_before_writing(kwargs, message,
                                                        tmp_path):
    with pytest.raises(ValueError) as err:
        sweep(directory=tmp_path / "run", **kwargs)
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_the_api_takes_numpy_integers_as_ints():
    # Was: workers=np.int64(0) refused; a NumPy grid_steps reached
    # settings.json and json could not write it.
    from tuning.sweep import search_settings
    from tuning.workers import check_workers

    settings = search_settings(
        tuner="grid", max_trials=np.int64(3), epochs=np.int32(2),
        batch_size=np.int64(16), seed=np.uint32(5), subset=np.int64(50),
        space=SearchSpace(grid_steps=np.int64(2), modes=np.bool_(True)))
    assert json.loads(json.dumps(settings))["space"]["grid_steps"] == 2
    assert [type(settings[k]) for k in ("max_trials", "epochs", "batch_size",
                                        "seed", "subset")] == [int] * 5
    assert type(check_workers(np.int64(0))) is int


@pytest.mark.parametrize("argv0,shown", [
    ("/venv/bin/adam-plus-tune", "adam-plus-tune"),
    ("/repo/tuning/__main__.py", "python -m tuning")])
def test_usage_and_errors_name_the_command_typed(argv0, shown, monkeypatch,
                                                  capsys):
    # Was: adam-plus-tune said `usage: python -m tuning`.
    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {shown} [-h]")
    with pytest.raises(SystemExit):
        cli_main(["report", "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {shown} report")
    with pytest.raises(SystemExit) as exit:
        cli_main(["--max-trials", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith(f"{shown}: error: ")


def test_sweep_and_the_cli_share_their_defaults(tmp_path, monkeypatch):
    # Was: sweep() ran 10 trials into tuning_runs/ (the CLI: 12 into
    # tuning_runs/<benchmark>): a default sweep() after the CLI wrote
    # keras-tuner's files into the CLI's search folder.
    import inspect

    from tuning.cli import sweep_parser

    module = importlib.import_module("tuning.sweep")
    assert inspect.signature(sweep).parameters["max_trials"].default == (
        sweep_parser().get_default("max_trials")) == 12
    seen = []
    monkeypatch.setattr(module, "_search",
                        lambda settings, directory, *a: seen.append(
                            (settings["max_trials"], directory)))
    monkeypatch.chdir(tmp_path)
    sweep(benchmark="mnist_logreg")
    assert seen == [(12, Path("tuning_runs/mnist_logreg"))]


@pytest.mark.parametrize("tuner", ["grid", "random"])
def test_sweep_and_the_cli_search_the_same_space(tuner, tmp_path,
                                                 monkeypatch):
    # Was: a grid search from sweep() had 100 points where the CLI's had
    # 20 (the CLI turned grid_steps 0 into 1, sweep() did not).
    from tuning.cli import main as cli_main

    module = importlib.import_module("tuning.sweep")
    seen = []
    monkeypatch.setattr(module, "_search",
                        lambda settings, directory, overwrite, space, *a:
                        seen.append((settings, space)))
    tune = ("learning_rate", "beta_2")
    sweep(tuner=tuner, space=SearchSpace(tune=tune), directory=tmp_path)
    assert cli_main(["--tuner", tuner, "--tune", *tune, "--directory",
                     str(tmp_path)]) in (0, None)
    assert seen[0] == seen[1]
    assert seen[0][1].grid_steps == (1 if tuner == "grid" else 0)


def test_the_end_of_a_search_prints_how_to_use_best_json(tmp_path,
                                                         monkeypatch):
    # Was: a table and a file list, no next step.
    from keras_adam_plus import InverseSqrtDecay
    from tuning import rundir
    from tuning.cli import next_steps
    from tuning.search_space import optimizer_config

    monkeypatch.setattr(sys, "argv", ["/venv/bin/adam-plus-tune"])
    assert next_steps(tmp_path, [], False) == []  # no best: nothing to use
    rundir.write_json(tmp_path / "best.json", optimizer_config(
        dict(PAPER_DEFAULTS, learning_rate=0.02), "inverse_sqrt"))
    lines = next_steps(tmp_path, ["--benchmark", "mnist_logreg"], False)
    assert lines[-1] == ("    adam-plus-tune --benchmark mnist_logreg "
                         "--confirm")
    assert not any("--confirm" in line
                   for line in next_steps(tmp_path, [], True))
    # Never with --overwrite: that rerun deleted the search it was to check.
    assert next_steps(tmp_path, ["--overwrite", "--epochs", "4"], False)[
        -1] == "    adam-plus-tune --epochs 4 --confirm"
    scope = {}
    exec("\n".join(line.strip() for line in lines[2:4]), scope)  # as shown
    schedule = scope["optimizer"]._learning_rate
    assert isinstance(schedule, InverseSqrtDecay)
    assert schedule.initial_learning_rate == 0.02
    # The paper's defaults won: nothing to confirm them against (was: the
    # same --confirm advice, and "tuned 1.2981, paper defaults 1.2981").
    rundir.write_json(tmp_path / "best.json", dict(PAPER_DEFAULTS))
    lines = next_steps(tmp_path, ["--epochs", "4"], False)
    assert lines[-2:] == [
        "  the best trial is the paper's defaults (AdamPlus() as it is); to "
        "search further, add trials (a rerun resumes):",
        "    adam-plus-tune --epochs 4 --max-trials N"]


def test_the_cli_offers_every_oracle():
    from tuning.sweep import TUNERS
    from tuning.tuners import ORACLES

    assert TUNERS == tuple(ORACLES)
