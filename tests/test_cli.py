"""`python -m tuning` as a user runs it: the real CLI in a subprocess.

Every mistake is one line on stderr, a non-zero exit and nothing written;
argument mistakes are caught before Keras (and TensorFlow) is imported, so
these cost a fraction of a second each. The process machinery (Ctrl-C, a
second run, a dead chief) does not depend on the Keras backend: those tests
run once, on one backend, to keep CI under its budget.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.test_tuning import once_on
from tuning import rundir
from tuning.cli import report_parser, sweep_parser
from tuning.errors import command, quoted

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m tuning"
INTERRUPTED = "interrupted; rerun the same command to resume\n"


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    # A user's shell: no TF_CPP_MIN_LOG_LEVEL (conftest and CI set one),
    # no TF_ENABLE_ONEDNN_OPTS (TensorFlow 2.21 on some CPUs, AMD EPYC
    # here, logs its oneDNN notice and absl's warning before it whatever
    # TF_CPP_MIN_LOG_LEVEL says: the CLI sets both where the user did not).
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        if name not in extra:
            env.pop(name, None)
    return env


def run(*args, timeout=300, **env):
    """Runs `python -m tuning *args` from the repository root."""
    return subprocess.run([sys.executable, "-m", "tuning", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=_env(**env))


def _as_from_a_terminal():
    # A command started in the background of a script (`cmd &`, as a CI
    # runner may start the suite) inherits SIGINT ignored, and Python then
    # keeps ignoring Ctrl-C; a user's terminal delivers it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, **env):
    return subprocess.Popen([sys.executable, "-m", "tuning", *args],
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(**env),
                            preexec_fn=_as_from_a_terminal)


def _wait_for_line(proc, prefix, timeout=240):
    """Reads proc's stdout until a line starts with `prefix`."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
        assert time.time() < deadline, f"no line {prefix!r} in {timeout} s"
    raise AssertionError(f"the command ended without a line {prefix!r}")


SMALL = ("--subset", "200", "--no-plots")
# (options, the one line after "python -m tuning: error: ").
BAD_OPTIONS = [
    (["--max-trials", "0"],
     "argument --max-trials: must be an integer >= 1, got '0'"),
    (["--max-trials", "-1"],
     "argument --max-trials: must be an integer >= 1, got '-1'"),
    (["--max-trials", "many"],
     "argument --max-trials: must be an integer >= 1, got 'many'"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
    (["--batch-size", "0"],
     "argument --batch-size: must be an integer >= 1, got '0'"),
    (["--subset", "2.5"], "argument --subset: must be a fraction in (0, 1] "
     "or a whole count in [1, 2147483647], got '2.5'"),
    (["--subset", "0"], "argument --subset: must be a fraction in (0, 1] or "
     "a whole count in [1, 2147483647], got '0'"),
    (["--workers", "-1"],
     "argument --workers: must be an integer >= 0 or auto, got '-1'"),
    (["--seed", "-3"], "argument --seed: must be an integer >= 0, got '-3'"),
    (["--objective", "nope"], "argument --objective: benchmark digits logs "
     "loss, accuracy, val_loss, val_accuracy; got 'nope'"),
    (["--benchmark", "mnist_vae", "--objective", "val_accuracy"],
     "argument --objective: benchmark mnist_vae logs loss, val_loss; got "
     "'val_accuracy'"),
    (["--direction", "up"], "argument --direction: invalid choice: 'up' "
     "(choose from 'min', 'max')"),
    (["--grid-steps", "2"], "argument --grid-steps: only with --tuner grid"),
    (["--tuner", "grid", "--grid-steps", "0"],
     "argument --grid-steps: must be an integer >= 1, got '0'"),
    (["--seeds", "3"], "argument --seeds: only with --confirm"),
    (["--confirm", "0"],
     "argument --confirm: must be an integer >= 1, got '0'"),
    (["--confirm", "--seeds", "1"],
     "argument --seeds: must be an integer >= 2, got '1'"),
    (["--dataset", "mnist"],
     "argument --dataset: benchmark digits has no dataset choice"),
    (["--mnist-idx", "/no/such/folder"],
     "argument --mnist-idx: no such folder: /no/such/folder"),
    # Was: deduplicated silently.
    (["--tune", "learning_rate", "beta_1", "learning_rate"],
     "argument --tune: learning_rate given more than once"),
    (["--tune", "learning_rate", "layer_decy"],
     "argument --tune: invalid choice: 'layer_decy' (choose from "
     "'learning_rate', 'beta_1', 'beta_2', 'epsilon', 'layer_decay', "
     "'head_multiplier')"),
    # Was in the API's words ("Argument `tune` names ...").
    (["--benchmark", "mnist_logreg", "--tune", "layer_decay"],
     "argument --tune: benchmark mnist_logreg's model has one layer with "
     "variables, no depth for layer_decay"),
]


@once_on("tensorflow")
@pytest.mark.parametrize("options,message", BAD_OPTIONS,
                         ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_and_writes_nothing(options, message,
                                                     tmp_path):
    out = run("--directory", str(tmp_path / "run"), *options)
    assert (out.returncode, out.stderr, out.stdout) == (
        2, f"{PROG}: error: {message}\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.quick
def test_arguments_are_checked_before_keras_is_imported():
    code = ("import sys\nfrom tuning.cli import main\n"
            "try:\n    main(['--max-trials', '0'])\nexcept SystemExit:\n"
            "    print('keras' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                         capture_output=True, env=_env(), timeout=60)
    assert out.stderr.splitlines() == [
        f"{PROG}: error: argument --max-trials: must be an integer >= 1, "
        "got '0'", "False"]


@once_on("tensorflow")
@pytest.mark.parametrize("directory,reason", [
    ("/proc/tuning_x", "cannot create directory /proc/tuning_x: No such file "
     "or directory; choose another --directory"),
    ("/sys", "cannot write to directory /sys: Permission denied; fix its "
     "permissions or choose another --directory"),
])
def test_an_unwritable_directory_is_one_line(directory, reason):
    if not Path(directory).parent.is_dir():
        pytest.skip(f"{Path(directory).parent} does not exist here")
    out = run("--directory", directory, "--max-trials", "1")
    assert (out.returncode, out.stderr) == (1, f"{PROG}: error: {reason}\n")


@once_on("tensorflow")
def test_a_file_or_empty_path_as_directory_is_one_line(tmp_path):
    # Were: a 27-line NotADirectoryError traceback, and "" ran a sweep.
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = run("--directory", str(afile), "--max-trials", "1")
    # Was: "cannot create directory ...: File exists" (a new user).
    assert (out.returncode, out.stderr) == (
        1, f"{PROG}: error: {afile} is a file, not a directory; choose "
        "another --directory\n")
    out = run("--directory", str(afile / "x"), "--max-trials", "1")
    assert (out.returncode, out.stderr) == (
        1, f"{PROG}: error: cannot create directory {afile / 'x'}: Not a "
        "directory; choose another --directory\n")
    # Was: "run `python -m tuning --directory <the file>` first".
    for path in (afile, afile / "x"):
        out = run("report", str(path))
        assert (out.returncode, out.stderr) == (
            1, f"{PROG}: error: {path} holds no tuning run (no readable "
            "settings.json); that is a file, not a folder: pass the folder "
            "a search wrote (the search's --directory)\n")
    for args in (["--directory", ""], ["report", ""]):
        out = run(*args)
        assert out.returncode == 2
        assert out.stderr.endswith("must be a folder path, got ''\n")
        assert len(out.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@once_on("tensorflow")
def test_report_without_a_run_is_one_line(tmp_path):
    out = run("report", str(tmp_path))
    assert (out.returncode, out.stderr) == (
        1, f"{PROG}: error: {tmp_path} holds no tuning run (no readable "
        f"settings.json); run `{PROG} --directory {tmp_path}` first\n")
    # The suggested command runs as pasted (a new user's 'a b' did not).
    spaced = tmp_path / "a b"
    spaced.mkdir()
    out = run("report", str(spaced))
    spaced.rmdir()
    assert out.stderr.endswith(f"run `{PROG} --directory '{spaced}'` "
                               "first\n")
    out = run("report")
    assert (out.returncode, out.stderr) == (
        2, f"{PROG} report: error: the following arguments are required: "
        "DIR\n")
    assert list(tmp_path.iterdir()) == []


@once_on("tensorflow")
def test_missing_data_is_its_message_alone(tmp_path):
    # imdb.npz is not in the offline datasets, and there is no network.
    home = tmp_path / "keras_home"
    (home / "datasets").mkdir(parents=True)
    out = run("--benchmark", "imdb_bow_logreg", "--directory",
              str(tmp_path / "run"), KERAS_HOME=str(home))
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{PROG}: error: Dataset 'imdb' is not cached")
    assert lines[0].endswith(
        f"Without a network, place imdb.npz in {home / 'datasets'}/ (or set "
        "KERAS_HOME to a folder whose datasets/ holds it).")
    assert not (tmp_path / "run").exists()


@pytest.mark.quick
def test_help_shows_every_default_and_the_subcommands():
    for parser in (sweep_parser(), report_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = parser._get_formatter()._get_help_string(action)
                assert "default" in text, action.dest
    out = subprocess.run([sys.executable, "-m", "tuning", "--help"],
                         cwd=ROOT, capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.returncode == 0
    assert f"{PROG} report DIR" in out.stdout
    assert f"{PROG} replicate" in out.stdout
    assert "(default: 12)" in out.stdout


@pytest.mark.quick
def test_packaging_extras_state_ranges_and_ci_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for extra, requirements in project["project"][
        "optional-dependencies"
    ].items():
        for requirement in requirements:  # ranges, not pins
            version = requirement.split(";")[0]
            assert "==" not in version, (extra, requirement)
    assert "torch>=2.4" in project["project"]["optional-dependencies"]["torch"]
    pins = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    readme = (ROOT / "README.md").read_text()
    installs = [line for line in readme.splitlines()
                if "pip install" in line]
    assert installs and all("-c .ci/constraints.txt" in line
                            for line in installs), installs


def _saved_run(directory, **settings):
    """A directory as a finished default search leaves it (settings)."""
    from tuning.sweep import search_settings

    directory.mkdir()
    saved = dict(search_settings(**settings), direction="min",
                 data="sklearn digits", project="digits")
    rundir.write_json(directory / rundir.SETTINGS, saved)
    return (directory / rundir.SETTINGS).read_bytes()


WAYS_OUT = (". Rerun with --overwrite to start afresh, or choose another "
            "--directory\n")
CHANGES = [
    (["--epochs", "4"], "epochs 1 there, 4 now"),
    (["--epochs", "1", "--tune", "learning_rate"],
     "tune ['learning_rate', 'beta_1', 'beta_2', 'epsilon'] there, "
     "['learning_rate'] now"),
    (["--epochs", "1", "--tuner", "bayesian"],
     "tuner 'random' there, 'bayesian' now"),
    (["--epochs", "1", "--subset", "300"], "subset 200 there, 300 now"),
    (["--epochs", "1", "--max-trials", "3"],
     "max_trials 4 there, 3 now (it may only grow)"),
    (["--epochs", "2", "--seed", "1"],
     "epochs 1 there, 2 now; seed 0 there, 1 now"),
]


@once_on("tensorflow")
@pytest.mark.parametrize("options,difference", CHANGES,
                         ids=[" ".join(o) for o, _ in CHANGES])
def test_other_settings_on_a_directory_are_refused(options, difference,
                                                   tmp_path):
    before = _saved_run(tmp_path / "run", epochs=1, subset=200,
                        max_trials=4)
    out = run("--directory", str(tmp_path / "run"), "--subset", "200",
              "--max-trials", "4", "--no-plots", *options)
    assert (out.returncode, out.stderr) == (
        1, f"{PROG}: error: {tmp_path / 'run'} holds a search with other "
        f"settings: {difference}{WAYS_OUT}")
    assert (tmp_path / "run" / rundir.SETTINGS).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        rundir.SETTINGS]


@once_on("tensorflow")
def test_a_second_benchmark_in_the_same_directory_is_refused(tmp_path):
    before = _saved_run(tmp_path / "run", epochs=1)
    out = run("--directory", str(tmp_path / "run"), "--benchmark",
              "mnist_logreg", "--epochs", "1")
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"{PROG}: error: {tmp_path / 'run'} holds a search with other "
        "settings: benchmark 'digits' there, 'mnist_logreg' now; ")
    assert out.stderr.endswith(WAYS_OUT) and out.stderr.count("\n") == 1
    assert (tmp_path / "run" / rundir.SETTINGS).read_bytes() == before


@once_on("tensorflow")
def test_report_ends_with_a_next_step(tmp_path):
    _saved_run(tmp_path / "run", epochs=1)
    out = run("report", str(tmp_path / "run"), "--no-plots")
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines()[-1] == (
        "next step: no trial has completed yet; rerun the search's command "
        "to resume it")


@pytest.mark.quick
@pytest.mark.parametrize("text", ["run", "a b", "it's", "a\nb", "x\x1b[31my",
                                  "t\tab\\'\x7f", "c\x85d"])
def test_quoted_paths_are_one_line_and_paste_back(text):
    from tuning.errors import quoted

    shown = quoted(text)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", shown)
    assert (shown == "run") == (text == "run")  # plain stays plain
    back = subprocess.run(["bash", "-c", f"printf %s {shown}"],
                          capture_output=True, text=True, timeout=10)
    assert back.stdout == text


@once_on("tensorflow")
def test_control_characters_in_a_folder_name_are_escaped(tmp_path):
    # Was echoed raw: the newline broke the one-line error, and a terminal
    # obeyed the escape sequence (red text).
    odd = tmp_path / "a\x1b[31mb\nc"
    out = run("report", str(odd))
    shown = f"$'{tmp_path}/a\\x1b[31mb\\nc'"
    assert (out.returncode, out.stderr) == (
        1, f"{PROG}: error: {shown} holds no tuning run (no readable "
        f"settings.json); run `{PROG} --directory {shown}` first\n")


def test_tensorflow_start_up_quiet_unless_the_user_chose():
    from tuning.cli import quiet_tensorflow

    environ = {}
    quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "2",
                       "TF_ENABLE_ONEDNN_OPTS": "0"}
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "1"}
    quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0",
                       "TF_ENABLE_ONEDNN_OPTS": "1"}


@pytest.mark.quick
def test_a_run_leaves_no_lock_file_and_two_never_hold_it(tmp_path,
                                                         monkeypatch):
    import fcntl

    with rundir.lock(tmp_path):
        assert (tmp_path / rundir.LOCK).is_file()
    # Was: .lock stayed in every output folder.
    assert list(tmp_path.iterdir()) == []
    # A process opens .lock just as its holder removes it and lets go: it
    # must hold the file now at the path, not the removed one (else a
    # third process would create and take a new .lock beside it).
    real, removed = fcntl.flock, []

    def flock(fd, operation):
        if not removed:
            removed.append((tmp_path / rundir.LOCK).unlink())
        return real(fd, operation)

    (tmp_path / rundir.LOCK).write_text("")
    monkeypatch.setattr(fcntl, "flock", flock)
    with rundir.lock(tmp_path):
        other = os.open(tmp_path / rundir.LOCK, os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(BlockingIOError):
                real(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert removed and list(tmp_path.iterdir()) == []


@pytest.mark.quick
def test_a_confirmation_says_when_another_beat_best_json():
    from tuning.report import confirm_lines

    def config(label, mean, std, default=False):
        return {"label": label, "mean": mean, "std": std,
                "is_default": default}

    confirmed = {"seeds": [1, 2, 3], "epochs": 4, "objective": "val_loss",
                 "direction": "min",
                 "configs": [config("trial 0", 0.30, 0.02),
                             config("trial 7", 0.25, 0.01),
                             config("trial 3", 0.27, 0.01),
                             config("paper default", 0.40, 0.03, True)]}
    lines = confirm_lines(confirmed)
    # Was: silence; best.json still holds trial 0 (the search's pick).
    assert lines[-1] == (
        "note: trial 7 beat best.json's trial 0 on the confirmed mean "
        "(0.2500 ± 0.0100 vs 0.3000 ± 0.0200); best.json keeps the search's "
        "pick (one seed, chosen before the confirmation). Next step: to "
        "train with trial 7's configuration, use its \"optimizer\" in "
        "confirm.json with AdamPlus.from_config")
    confirmed["direction"] = "max"  # the defaults' mean is the highest
    assert confirm_lines(confirmed)[-1].startswith(
        "note: paper default beat best.json's trial 0 on the confirmed mean")
    confirmed["configs"][-1]["mean"] = 0.1  # now trial 0's is
    assert not confirm_lines(confirmed)[-1].startswith("note:")


@once_on("tensorflow")
def test_ctrl_c_after_replicate_s_last_line_is_not_a_silent_130(tmp_path):
    # The interpreter's teardown of TensorFlow and JAX took seconds after
    # the last line; a Ctrl-C then killed the process silently (130).
    proc = start("replicate", "--figure", "amsgrad", "--scale", "tiny",
                 "--directory", str(tmp_path))
    _wait_for_line(proc, "next step: ")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # Now no teardown follows the last line: the command had ended (0), or
    # the Ctrl-C came as it returned (its one line, 130); never silent.
    assert (proc.returncode, err) in ((0, ""), (130, INTERRUPTED))


@once_on("tensorflow")
def test_a_second_run_on_a_directory_in_use_stops(tmp_path):
    with rundir.lock(tmp_path):
        out = run("--directory", str(tmp_path), "--max-trials", "1")
        since = json.loads((tmp_path / rundir.LOCK).read_text())["since"]
    assert out.returncode == 1
    # The holder's command as typed (was sys.argv: .../__main__.py ...).
    typed = " ".join([command(), *map(quoted, sys.argv[1:])])
    assert out.stderr == (
        f"{PROG}: error: directory {tmp_path} is in use by pid "
        f"{os.getpid()} on {os.uname().nodename} since {since} "
        f"({typed}); wait for it to finish or choose another "
        "--directory\n")
    assert list(tmp_path.iterdir()) == []  # and its .lock removed after


@once_on("tensorflow")
def test_report_on_a_running_search_does_not_say_rerun_it(tmp_path):
    # Was: "rerun the search's command to resume it", which the lock then
    # refused.
    assert run("--directory", str(tmp_path), *SMALL, "--epochs", "1",
               "--max-trials", "1").returncode == 0
    with rundir.lock(tmp_path):
        out = run("report", str(tmp_path), "--no-plots")
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    assert last.startswith(f"next step: a search is running there (pid "
                           f"{os.getpid()} ")
    assert rundir.running(tmp_path) is None
    # A finished search rerun says so before its summary (was: silent).
    again = run("--directory", str(tmp_path), *SMALL, "--epochs", "1",
                "--max-trials", "1")
    assert "nothing to run: 1 trial done\n" in again.stdout


@once_on("tensorflow")
def test_ctrl_c_is_one_line_and_the_trial_is_kept_for_resume(tmp_path):
    proc = start("--directory", str(tmp_path), *SMALL, "--epochs", "30",
                 "--max-trials", "3")
    _wait_for_line(proc, "trial 0:")
    _wait_for_line(proc, "Epoch 2/30")  # trial 1 is training
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # One line; no traceback, no TensorFlow startup log (item 15).
    assert (proc.returncode, err) == (130, INTERRUPTED)
    side = json.loads((tmp_path / "digits" / "trial_1" / rundir.SIDECAR)
                      .read_text())
    trial = json.loads((tmp_path / "digits" / "trial_1" / "trial.json")
                       .read_text())
    assert (side["status"], trial["status"]) == ("INTERRUPTED", "RUNNING")


@once_on("tensorflow")
def test_progress_direction_and_the_summary_of_an_accuracy_search(tmp_path):
    out = run("--directory", str(tmp_path), *SMALL, "--epochs", "2",
              "--max-trials", "3", "--objective", "val_accuracy")
    assert out.returncode == 0, out.stderr
    # No TensorFlow startup lines, no warnings: stderr is empty (item 15).
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    # Keras's epoch lines inside each trial, a progress line over the
    # search with its ETA (item 13); into a pipe, no control characters
    # (Keras's bar wrote \r, \b and colour codes).
    assert sum(line == "Epoch 2/2" for line in lines) == 3
    bars = [line for line in lines if line.startswith("progress: ")]
    assert len(bars) == 3 and bars[0].startswith("progress: 1/3 trials, ")
    assert bars[2].startswith("progress: 3/3 trials, ")
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out.stdout)
    table = json.loads((tmp_path / "trials.json").read_text())["trials"]
    scores = {t["trial_id"]: t["score"] for t in table}
    best = max(table, key=lambda t: t["score"])
    assert json.loads((tmp_path / "best.json").read_text()) == best[
        "optimizer"]
    assert best["score"] == max(scores.values())
    row = next(line for line in lines
               if line.startswith("val_accuracy, 2 epochs"))
    assert row.split()[3] == f"{best['score']:.4f}"
    assert ("objective val_accuracy, maximised; score = its value at a "
            "trial's best epoch") in out.stdout
    header = (tmp_path / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("trial_id,status,epochs,"
                             "val_accuracy_at_best_epoch,")
