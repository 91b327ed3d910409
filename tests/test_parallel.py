"""A parallel search that cannot run away: its bound, its children's death
with their launcher, one device per worker, a chief that others join.

Every launcher these tests start runs in a session of its own (`launch`),
and the whole session is killed when the test ends, passed or failed, so a
regression cannot leave processes behind on the test machine. The process
tests are backend-independent and run once, on TensorFlow.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import _wait_for_line
from tests.test_tuning import once_on
from tuning import cli, launcher, workers
from tuning.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m tuning"
SMALL = ("--subset", "200", "--no-plots", "--seed", "3")


# ------------------------------------------------------------- the guard


def _session_members(sid):
    """Pids of the live (not zombie) processes of session `sid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _kill_session(sid):
    for pid in _session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def launch():
    """Starts `python -m tuning *args` in a session of its own; every
    process of that session is killed when the test ends."""
    started = []

    def start(*args, **env):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuning", *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
            start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _kill_session(proc.pid)
        proc.kill()
        proc.communicate()


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


def _sidecars(directory):
    return {p.parent.name: json.loads(p.read_text())
            for p in Path(directory).glob("*/trial_*/adam_plus.json")}


def _trials(directory):
    table = json.loads((Path(directory) / "trials.json").read_text())
    return {t["trial_id"]: t for t in table["trials"]}


# ------------------------------------------------------------- the bound

# (devices, cores, memory MiB, the bound, why).
BOUNDS = [
    ([], 2, 24000, 2, "2 usable CPU cores and no GPU"),
    ([], 1, None, 1, "1 usable CPU core and no GPU"),
    (["0", "1", "2", "3"], 64, 512 * 1024, 4,
     "4 visible GPUs, one worker each"),
    (["0"], 2, 24000, 1, "1 visible GPU, one worker each"),
    ([], 64, 4 * workers.WORKER_MIB, 3,
     f"4.0 GiB of memory available, ~{workers.WORKER_MIB / 1024:g} GiB per "
     "worker plus the chief"),
    (["0", "1"], 8, workers.WORKER_MIB, 0,
     f"1.0 GiB of memory available, ~{workers.WORKER_MIB / 1024:g} GiB per "
     "worker plus the chief"),
]


@pytest.mark.parametrize("devices,cores,memory,most,why", BOUNDS)
def test_the_bound_names_what_limits_it(devices, cores, memory, most, why):
    assert workers.bound(devices, cores, memory) == (most, why)
    if most:
        assert workers.check_workers("auto", devices, cores, memory) == most
        assert workers.check_workers(most, devices, cores, memory) == most
    with pytest.raises(ValueError) as err:
        workers.check_workers(most + 1, devices, cores, memory)
    assert str(err.value) == (
        f"Argument `workers` must be at most {most} on this machine ({why}),"
        f" or 'auto'. Received: workers={most + 1}")


def test_sweep_refuses_workers_above_the_bound_before_writing(tmp_path):
    most, why = workers.bound()
    with pytest.raises(ValueError) as err:
        sweep(directory=tmp_path / "run", workers=100000, child_argv=[])
    assert str(err.value) == (
        f"Argument `workers` must be at most {most} on this machine ({why}),"
        " or 'auto'. Received: workers=100000")
    assert not (tmp_path / "run").exists()


def test_a_huge_workers_starts_no_process(tmp_path, monkeypatch, capsys):
    def popen(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--directory", str(tmp_path / "run"), "--workers",
                  "100000"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"{PROG}: error: argument --workers: must be at most ")
    assert not (tmp_path / "run").exists()


@once_on("tensorflow")
def test_a_huge_workers_is_one_line_within_seconds(tmp_path, launch):
    start = time.monotonic()
    proc = launch("--directory", str(tmp_path / "run"), "--workers",
                  "100000", TUNING_FAKE_DEVICES="")
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 5
    most, why = workers.bound(devices=[])
    # argparse's words, as every other option's (was Keras's constructor
    # message: "Argument `workers` must be ... Received: workers=100000").
    assert (proc.returncode, out, err) == (2, "", (
        f"{PROG}: error: argument --workers: must be at most {most} on this "
        f"machine ({why}), or auto, got '100000'\n"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- devices

# (CUDA_VISIBLE_DEVICES or the fake list, the devices a child sees).
VISIBLE = [("0,1,2", ["0", "1", "2"]), ("", []), ("-1", []),
           ("2,-1,3", ["2"]), ("GPU-8a1f,GPU-77c2", ["GPU-8a1f", "GPU-77c2"]),
           (" 4 , 6", ["4", "6"])]


@pytest.mark.parametrize("variable", [workers.FAKE_DEVICES,
                                      "CUDA_VISIBLE_DEVICES"])
@pytest.mark.parametrize("text,devices", VISIBLE)
def test_visible_devices_read_as_cuda_reads_them(variable, text, devices):
    assert workers.visible_devices({variable: text}) == devices


def test_the_fake_device_list_wins():
    assert workers.visible_devices({workers.FAKE_DEVICES: "5,6",
                                    "CUDA_VISIBLE_DEVICES": "0"}) == ["5",
                                                                      "6"]


def test_worker_i_sees_device_i_and_the_chief_none():
    devices = ["3", "5", "GPU-9c"]
    base = {"CUDA_VISIBLE_DEVICES": "3,5,GPU-9c", "PATH": "/bin"}
    chief = workers.child_env("chief", "0.0.0.0", 8000, devices, base, 42)
    assert (chief["CUDA_VISIBLE_DEVICES"], chief["KERASTUNER_TUNER_ID"],
            chief["KERASTUNER_ORACLE_IP"], chief["KERASTUNER_ORACLE_PORT"],
            chief[workers.LAUNCHER_PID], chief["PATH"]) == (
        "", "chief", "0.0.0.0", "8000", "42", "/bin")
    for i, device in enumerate(devices):
        env = workers.child_env(i, "127.0.0.1", 8000, devices, base, 42)
        assert (env["CUDA_VISIBLE_DEVICES"], env[workers.DEVICE],
                env["KERASTUNER_TUNER_ID"]) == (device, device, f"tuner{i}")
    # Without GPUs the environment's device settings are left alone.
    env = workers.child_env(0, "127.0.0.1", 8000, [], {"PATH": "/bin"}, 42)
    assert "CUDA_VISIBLE_DEVICES" not in env and env[workers.DEVICE] == "cpu"


def test_the_children_drop_the_launchers_options():
    argv = launcher.child_argv(["--workers", "2", "--chief=0.0.0.0:80",
                                "--overwrite", "--epochs", "1", "--chief",
                                "h:1", "--workers=auto", "--seed", "3"])
    assert argv == [sys.executable, "-m", "tuning", "--epochs", "1",
                    "--seed", "3"]


ADDRESSES = [("127.0.0.1:8000", ("127.0.0.1", 8000)),
             ("node-3:65535", ("node-3", 65535)), ("node-3:1", ("node-3", 1))]


@pytest.mark.parametrize("text,address", ADDRESSES)
def test_addresses(text, address):
    assert workers.parse_address(text) == address


@pytest.mark.parametrize("option", ["--chief", "--join"])
@pytest.mark.parametrize("text", ["localhost", ":8000", "host:0",
                                  "host:65536", "host:80x", "[::1]:80",
                                  "::1:80"])
def test_a_bad_address_is_one_line(option, text):
    with pytest.raises(SystemExit) as exit_:
        cli.sweep_parser().parse_args([option, text])
    assert exit_.value.code == 2


@pytest.mark.parametrize("argv", [["--work", "2"], ["--chie", "h:1"],
                                  ["--workers=1", "--jo", "h:1"]])
def test_abbreviated_options_are_refused(argv):
    # An abbreviation reached the children (the launcher drops its own
    # options by full name), and each child launched again (review).
    with pytest.raises(SystemExit) as exit_:
        cli.sweep_parser().parse_args(argv)
    assert exit_.value.code == 2


def test_a_chief_or_worker_launches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    with pytest.raises(ValueError, match="launches nothing itself"):
        sweep(directory=tmp_path / "run", workers=1, child_argv=[])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("host", ["chief-01", "mischief", "node"])
def test_a_joiners_id_is_never_taken_for_the_chief(host):
    # keras-tuner takes any id containing "chief" for the chief.
    tuner_id = workers.joiner_id(host, 42)
    assert "chief" not in tuner_id and tuner_id.endswith("-42")


def test_an_unresolvable_chief_host_is_one_line():
    chief = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(launcher.SweepFailed, match=(
                "^cannot resolve the chief's host 'no-such-host.invalid'")):
            launcher._wait_for_port("no-such-host.invalid", 5000,
                                    {"the chief": chief}, 0.1, 5)
    finally:
        chief.kill()
        chief.wait()


# ------------------------------------------------------------- processes


def _training(directory):
    """Whether a trial is being trained."""
    return any(s["status"] == "RUNNING"
               for s in _sidecars(directory).values())


@once_on("tensorflow")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_no_child_outlives_its_launcher_and_the_rerun_completes(
        signum, tmp_path, launch):
    args = ("--directory", str(tmp_path), *SMALL, "--epochs", "10",
            "--max-trials", "2", "--workers", "2")
    proc = launch(*args)
    _wait_for(lambda: _training(tmp_path), 180, "a running trial")
    assert len(_session_members(proc.pid)) == 4  # launcher, chief, workers
    proc.send_signal(signum)
    killed = time.monotonic()
    _wait_for(lambda: not _session_members(proc.pid), 10,
              "the end of every chief and worker")
    gone = time.monotonic() - killed
    out, err = proc.communicate(timeout=10)
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signum
        assert err.splitlines()[-1] == (
            "stopped by SIGTERM; rerun the same command to resume")
    else:
        assert proc.returncode == -signum
    if signum == signal.SIGTERM:  # released and removed
        assert not (tmp_path / ".lock").exists()
    else:  # left behind by a killed launcher, but released
        with open(tmp_path / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print(f"{signal.Signals(signum).name}: children gone in {gone:.1f} s")
    _finish(launch(*args))  # the same command resumes
    trials = _trials(tmp_path)
    assert sorted(t["status"] for t in trials.values()) == ["COMPLETED"] * 2


@once_on("tensorflow")
def test_a_dead_chief_stops_the_workers_within_seconds(tmp_path, launch):
    proc = launch("--directory", str(tmp_path), *SMALL, "--epochs", "20",
                  "--max-trials", "6", "--workers", "2")
    line = _wait_for_line(proc, "distributed: chief pid ")
    chief = int(line.split()[3])
    os.kill(chief, signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert proc.returncode == 1
    assert err.splitlines()[-1] == (
        f"{PROG}: error: the chief (pid {chief}) was killed by SIGKILL; "
        "stopped the other 2 processes; rerun the same command to resume")
    assert _session_members(proc.pid) == []  # stopped and reaped


def _one_process(directory, launch):
    _finish(launch("--directory", str(directory), *SMALL, "--epochs", "1",
                   "--max-trials", "5"))
    return _trials(directory)


def _same_trials(parallel, alone):
    assert sorted(parallel) == sorted(alone) == ["0", "1", "2", "3", "4"]
    for trial_id, trial in alone.items():
        assert parallel[trial_id]["status"] == "COMPLETED"
        assert (parallel[trial_id]["hyperparameters"]
                == trial["hyperparameters"])
        assert parallel[trial_id]["score"] == trial["score"]


@once_on("tensorflow")
def test_two_workers_give_the_trials_of_one_process_one_device_each(
        tmp_path, launch):
    alone = _one_process(tmp_path / "alone", launch)
    out = _finish(launch("--directory", str(tmp_path / "two"), *SMALL,
                         "--epochs", "1", "--max-trials", "5", "--workers",
                         "2", TUNING_FAKE_DEVICES="7,9"))
    # Our trial lines, not keras-tuner's display as well (a new user saw
    # "Search: Running Trial #1" tables beside "trial 0: ...").
    assert "Running Trial" not in out and "Best val_loss So Far" not in out
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 5
    parallel = _trials(tmp_path / "two")
    _same_trials(parallel, alone)
    used = {(t["worker"], t["device"]) for t in parallel.values()}
    assert used <= {("tuner0", "7"), ("tuner1", "9")} and len(used) == 2
    header, *rows = (tmp_path / "two" / "trials.csv").read_text().splitlines()
    assert header.endswith(",worker,device")
    assert {tuple(row.split(",")[-2:]) for row in rows} == used
    assert {(t["worker"], t["device"]) for t in alone.values()} == {
        ("local", "cpu")}


@once_on("tensorflow")
def test_a_chief_and_two_joiners_give_the_trials_of_one_process(
        tmp_path, launch):
    alone = _one_process(tmp_path / "alone", launch)
    address = f"127.0.0.1:{workers.free_port()}"
    options = ("--directory", str(tmp_path / "joined"), *SMALL, "--epochs",
               "1", "--max-trials", "5")
    chief = launch(*options, "--chief", address)
    joiners = [launch(*options, "--join", address) for _ in range(2)]
    out = _finish(chief)
    assert "trials: 5 COMPLETED" in out
    for joiner in joiners:
        _finish(joiner, timeout=30)
    joined = _trials(tmp_path / "joined")
    _same_trials(joined, alone)
    ids = {t["worker"] for t in joined.values()}
    assert ids <= {workers.joiner_id(os.uname().nodename, j.pid)
                   for j in joiners}
    for name in ("best.json", "summary.txt", "trials.csv"):
        assert (tmp_path / "joined" / name).is_file()
    assert not (tmp_path / "joined" / "chief.json").exists()


@once_on("tensorflow")
def test_a_joiner_with_other_settings_is_refused_in_one_line(
        tmp_path, launch):
    address = f"127.0.0.1:{workers.free_port()}"
    options = ("--directory", str(tmp_path), *SMALL, "--max-trials", "2")
    chief = launch(*options, "--epochs", "1", "--chief", address)
    _wait_for(lambda: (tmp_path / "chief.json").exists(), 120, "chief.json")
    joiner = launch(*options, "--epochs", "2", "--join", address)
    out, err = joiner.communicate(timeout=120)
    # (TensorFlow's own startup lines may come first.)
    assert (joiner.returncode, err.splitlines()[-1]) == (1, (
        f"{PROG}: error: the chief at {address} runs another search or "
        "other packages: epochs 1 there, 2 here; run the chief's command "
        "with the chief's packages"))
    assert "Traceback" not in err
    # The chief still serves; a joiner with its settings ends the search.
    _finish(launch(*options, "--epochs", "1", "--join", address))
    _finish(chief)
    assert [t["status"] for t in _trials(tmp_path).values()] == [
        "COMPLETED"] * 2


def test_a_joiner_with_other_packages_is_refused(tmp_path, monkeypatch):
    from tuning import distributed

    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "node-1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    settings = {"benchmark": "digits", "epochs": 1, "max_trials": 4}
    theirs = dict(distributed.versions(), keras="0.0.1")
    (tmp_path / distributed.CHIEF).write_text(json.dumps({
        "address": "0.0.0.0:8000", "settings": dict(settings, max_trials=9),
        "versions": theirs}))
    with pytest.raises(distributed.TuningError) as err:
        distributed.check_chief(tmp_path, settings)
    assert str(err.value) == (
        "the chief at node-1:8000 runs another search or other packages: "
        f"keras 0.0.1 there, {distributed.versions()['keras']} here; run the "
        "chief's command with the chief's packages")
    theirs["keras"] = distributed.versions()["keras"]
    (tmp_path / distributed.CHIEF).write_text(json.dumps({
        "address": "0.0.0.0:8000", "settings": settings, "versions": theirs}))
    distributed.check_chief(tmp_path, settings)  # the same: joins
    (tmp_path / distributed.CHIEF).unlink()
    with pytest.raises(distributed.TuningError) as err:
        distributed.check_chief(tmp_path, settings, wait_s=0.2)
    assert str(err.value) == (
        f"no chief serving port 8000 wrote {tmp_path / distributed.CHIEF} "
        "within 0.2 s; --directory must be the chief's run folder, shared "
        "with it")


@once_on("tensorflow")
def test_a_dead_joiner_loses_only_its_trial_and_a_late_one_takes_over(
        tmp_path, launch):
    address = f"127.0.0.1:{workers.free_port()}"
    options = ("--directory", str(tmp_path), *SMALL, "--epochs", "30",
               "--max-trials", "2")
    chief = launch(*options, "--chief", address, TUNING_LEASE_S="3")
    doomed = launch(*options, "--join", address)
    _wait_for(lambda: _training(tmp_path), 180, "a running trial")
    doomed.kill()
    late = launch(*options, "--join", address)
    out = _finish(chief)
    doomed_id = workers.joiner_id(os.uname().nodename, doomed.pid)
    assert f"worker {doomed_id} silent for 3 s: trial 0 runs again" in out
    _finish(late, timeout=30)
    trials = _trials(tmp_path)
    assert [t["status"] for t in trials.values()] == ["COMPLETED"] * 2
    assert {t["worker"] for t in trials.values()} == {
        workers.joiner_id(os.uname().nodename, late.pid)}


def test_a_kill_between_trial_and_oracle_files_runs_the_trial_again(
        tmp_path):
    import keras_tuner

    from tuning import tuners

    def oracle():
        hps = keras_tuner.HyperParameters()
        hps.Float("x", 0.0, 1.0, default=0.5)
        made = tuners.oracle_class("random")(
            objective=keras_tuner.Objective("loss", "min"), max_trials=2,
            seed=1, hyperparameters=hps)
        made._set_project_dir(str(tmp_path), "p")
        return made

    first = oracle()
    first.create_trial("tuner0")
    before = (tmp_path / "p" / "oracle.json").read_text()
    first.create_trial("tuner1")  # writes trial_1/trial.json, oracle.json
    (tmp_path / "p" / "oracle.json").write_text(before)  # killed between
    again = oracle()
    again.reload()
    assert {again.create_trial(t).trial_id for t in ("a", "b")} == {"0", "1"}
    assert again.create_trial("c").status == "STOPPED"
