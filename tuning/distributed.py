"""keras-tuner's chief and workers, made to end by themselves.

keras-tuner's own chief (`oracle_chief.start_server`) waits for every
worker that ever asked for a trial to be told "stopped", so a worker that
dies keeps it, and its trial, forever; and it checks only every 20 s. Here:

- `serve()` runs the same gRPC service (keras-tuner's `OracleServicer`) on
  the chief's address and ends once the oracle has stopped and every live
  worker has been told so. A worker silent for `LEASE_S` seconds is
  declared dead: its running trial goes back to the queue and runs again
  on the next worker that asks (one joining later too).
- `keep_alive()` (in a worker) tells the chief every `HEARTBEAT_S` seconds
  that it still runs its trial, and ends the worker once the chief has
  been unreachable for `LEASE_S` seconds.
- The chief writes `chief.json` (its address, settings and package
  versions) into the run folder; `check_chief()` (in a worker) refuses,
  in one line, to join a chief whose settings or versions differ.

The service has no authentication (keras-tuner's is plain gRPC): serve it
on trusted networks only; loopback is the default.
"""

import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import keras
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_chief import OracleServicer
from keras_tuner.src.engine.oracle import synchronized

from tuning import report, rundir
from tuning.errors import TuningError, quoted

CHIEF = "chief.json"
# A worker's sign of life to the chief, and how long the chief waits for
# one before it gives the worker's trial to another (a worker stalls for
# a few seconds at most: Keras releases the GIL while it computes).
HEARTBEAT_S = 2.0
def _lease_s():
    try:
        value = float(os.environ.get("TUNING_LEASE_S", 60))
    except ValueError:
        value = 0.0
    return value if value > 0 else 60.0  # a bad override: the default


LEASE_S = _lease_s()
# How long a worker waits for the chief's `chief.json` to appear.
JOIN_WAIT_S = 600
POLL_S = 0.5


def role():
    """"chief", "worker" or None (a one-process search)."""
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID")
    if not tuner_id:
        return None
    # keras-tuner's own test (`is_chief_oracle`): "chief" in the id.
    return "chief" if "chief" in tuner_id else "worker"


def versions():
    """What must match between a chief and its workers: the packages that
    decide a trial's numbers, and the Keras backend."""
    return dict(report.versions(), backend=keras.backend.backend())


class Leases:
    """Oracle mixin: remembers when each worker last spoke; `reap()` gives
    the trials of silent workers to others."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._heard = {}  # tuner id -> time.monotonic() of its last call

    @synchronized
    def create_trial(self, tuner_id):
        self._heard[tuner_id] = time.monotonic()
        return super().create_trial(tuner_id)

    @synchronized
    def update_trial(self, trial_id, metrics, step=0):
        self._heard_on(trial_id)
        return super().update_trial(trial_id, metrics, step=step)

    def get_trial(self, trial_id):
        self._heard_on(trial_id)  # a worker's heartbeat (`keep_alive`)
        return super().get_trial(trial_id)

    def _heard_on(self, trial_id):
        for tuner_id, trial in list(self.ongoing_trials.items()):
            if trial.trial_id == trial_id:
                self._heard[tuner_id] = time.monotonic()

    @synchronized
    def reap(self, lease_s):
        """Forgets workers silent for `lease_s` seconds; their running
        trials go back to the queue. Returns [(tuner id, trial id)]."""
        now, reaped = time.monotonic(), []
        for tuner_id in sorted(self.tuner_ids):
            if now - self._heard.get(tuner_id, now) <= lease_s:
                continue
            self.tuner_ids.discard(tuner_id)
            trial = self.ongoing_trials.pop(tuner_id, None)
            if trial is not None:
                self._retry_queue.append(trial.trial_id)
                reaped.append((tuner_id, trial.trial_id))
        if reaped:
            self.save()
        return reaped

    @synchronized
    def idle(self):
        """Whether no trial runs and no worker waits for an answer."""
        return not self.ongoing_trials and not self.tuner_ids


def serve(tuner, directory, settings, lease_s=None, poll_s=POLL_S):
    """Serves `tuner`'s oracle on keras-tuner's address until the search is
    over (see the module's docstring); removes `chief.json` on the way
    out."""
    lease_s = LEASE_S if lease_s is None else lease_s
    host = os.environ["KERASTUNER_ORACLE_IP"]
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    oracle = tuner.oracle
    tuner.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise TuningError(f"cannot serve on {host}:{port}: the port is in "
                          "use or the host is not an address of this machine")
    server.start()
    record = Path(directory) / CHIEF
    rundir.write_json(record, {"address": f"{host}:{port}",
                               "pid": os.getpid(), "settings": settings,
                               "versions": versions()})
    try:
        while not (servicer.stop_triggered and oracle.idle()):
            for tuner_id, trial_id in oracle.reap(lease_s):
                print(f"worker {tuner_id} silent for {lease_s:g} s: trial "
                      f"{trial_id} runs again", flush=True)
            time.sleep(poll_s)
    finally:
        server.stop(grace=1)
        record.unlink(missing_ok=True)


def check_chief(directory, settings, wait_s=JOIN_WAIT_S):
    """Waits for the chief's `chief.json` in `directory`; raises
    `TuningError` (one line) if its settings or versions differ."""
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{port}"
    path = Path(directory) / CHIEF
    deadline = time.monotonic() + wait_s
    chief = None
    while time.monotonic() < deadline:
        chief = rundir.read_json(path, "waiting for the chief to rewrite it")
        if chief and chief.get("address", "").rpartition(":")[2] == port:
            break
        time.sleep(POLL_S)
    else:
        raise TuningError(
            f"no chief serving port {port} wrote {quoted(path)} within "
            f"{wait_s:g} s; "
            "--directory must be the chief's run folder, shared with it")
    differences = rundir.settings_differences(
        chief["settings"], settings, now="here")
    differences += [f"{name} {chief['versions'].get(name)} there, {mine} "
                    "here" for name, mine in versions().items()
                    if chief["versions"].get(name) != mine]
    if differences:
        raise TuningError(
            f"the chief at {address} runs another search or other packages: "
            + "; ".join(differences)
            + "; run the chief's command with the chief's packages")


def keep_alive(tuner, heartbeat_s=HEARTBEAT_S, lease_s=None):
    """Starts a worker's heartbeat to its chief (see the module's
    docstring)."""
    lease_s = LEASE_S if lease_s is None else lease_s
    stub = tuner.oracle.stub
    service = protos.get_service()
    address = (f"{os.environ['KERASTUNER_ORACLE_IP']}:"
               f"{os.environ['KERASTUNER_ORACLE_PORT']}")

    def beat():
        heard = time.monotonic()
        while True:
            time.sleep(heartbeat_s)
            trial_id = tuner.running
            try:
                if trial_id is None:
                    stub.GetSpace(service.GetSpaceRequest(), timeout=5)
                else:
                    stub.GetTrial(service.GetTrialRequest(trial_id=trial_id),
                                  timeout=5)
                heard = time.monotonic()
            except grpc.RpcError:
                if time.monotonic() - heard > lease_s:
                    print(f"the chief at {address} has been unreachable for "
                          f"{lease_s:g} s; stopping", file=sys.stderr,
                          flush=True)
                    os._exit(1)  # the main thread may wait on it for hours

    threading.Thread(target=beat, name="keep-alive", daemon=True).start()
