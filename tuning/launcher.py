"""The launcher of a parallel search: a chief and workers it outlives.

`run()` starts keras-tuner's chief and N workers of the same command as
children, each in a process group of its own, each given its device
(`tuning.workers.child_env`), and waits for the chief to end by itself.
Whatever stops the launcher, its children stop too:

- a chief or worker that dies stops the others (`SweepFailed` says which);
- Ctrl-C, SIGTERM and SIGHUP stop them, then the launcher exits with one
  line;
- SIGKILL of the launcher: each child watches it (`workers.watch_launcher`:
  the kernel's parent-death signal on Linux, a polling thread everywhere)
  and exits within seconds.

This module imports no Keras; the children do.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from tuning import workers as machine
from tuning.errors import Stopped, TuningError


class SweepFailed(TuningError):
    """Every trial of a search failed, or its chief or a worker died."""


# Options of the launcher that its children must not repeat.
_LAUNCHER_ONLY = {"--workers": 1, "--chief": 1, "--overwrite": 0}


def run(workers, cli_args, address=None, poll_s=0.5, timeout_s=300,
        grace_s=10):
    """Runs a chief and `workers` workers of `python -m tuning *cli_args`.

    The chief serves on `address` (host, port), by default on loopback at
    a free port, and ends by itself once every trial has ended; with
    `address`, workers started elsewhere with `--join` take trials too.
    A chief or worker that dies (a signal, a non-zero exit) is noticed
    within `poll_s` seconds and the others are stopped (`SweepFailed`).
    Workers still running `grace_s` seconds after the chief ended are
    stopped; so is a chief still running `grace_s` seconds after the last
    worker of a loopback search ended.
    """
    argv = child_argv(cli_args)
    devices = machine.visible_devices()
    host, port = address or ("127.0.0.1", machine.free_port())
    dial = machine.connect_host(host)
    procs = {}
    with _stopped_by(signal.SIGTERM, signal.SIGHUP):
        try:
            chief = procs["the chief"] = _start(
                argv, machine.child_env("chief", host, port, devices))
            _wait_for_port(dial, port, procs, poll_s, timeout_s)
            for i in range(workers):
                procs[f"worker {i}"] = _start(
                    argv, machine.child_env(i, dial, port, devices))
            pids = " ".join(str(p.pid) for p in list(procs.values())[1:])
            print(f"distributed: chief pid {chief.pid} on {host}:{port}, "
                  f"worker pids {pids or '(none)'}", flush=True)
            if address:
                print(f"workers join with: python -m tuning <the same "
                      f"options> --join {dial}:{port}", flush=True)
            _wait(procs, open_to_joiners=address is not None, poll_s=poll_s,
                  grace_s=grace_s)
        finally:
            stop(procs.values())


def _wait(procs, open_to_joiners, poll_s, grace_s):
    """Until the chief ends (and its workers after it), or a child dies."""
    chief, workers = procs["the chief"], list(procs.values())[1:]
    ended = None
    while True:
        _check_exits(procs)
        if chief.poll() is not None:
            if all(p.poll() is not None for p in workers):
                return
            ended = ended or time.monotonic()
            if time.monotonic() - ended > grace_s:
                return  # workers waiting on a chief that left
        elif workers and not open_to_joiners and all(
            p.poll() is not None for p in workers
        ):
            ended = ended or time.monotonic()
            if time.monotonic() - ended > grace_s:
                return
        time.sleep(poll_s)


def _start(argv, env):
    # A group of its own: the terminal's Ctrl-C reaches the launcher only,
    # which stops the children; `stop` ends the group with whatever the
    # child started.
    return subprocess.Popen(argv, env=env, process_group=0)


@contextlib.contextmanager
def _stopped_by(*signums):
    """Turns these signals into `Stopped` (as Ctrl-C is KeyboardInterrupt)
    while the children run, so that `finally` stops them."""
    def handler(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


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


def stop(procs, grace_s=5):
    """Terminates the process groups of `procs`; kills them after
    `grace_s` seconds."""
    procs = list(procs)
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # the child's own children too
        proc.wait()


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group has ended


def child_argv(cli_args):
    """The command line of the children: the launcher's own options
    (`--workers`, `--chief`, `--overwrite`) dropped."""
    args, skip = [], 0
    for arg in cli_args:
        name = arg.split("=", 1)[0]
        if skip:
            skip -= 1
        elif name in _LAUNCHER_ONLY:
            skip = _LAUNCHER_ONLY[name] if "=" not in arg else 0
        else:
            args.append(arg)
    return [sys.executable, "-m", "tuning", *args]


def _wait_for_port(host, port, procs, poll_s, timeout_s):
    deadline = time.monotonic() + timeout_s
    chief = procs["the chief"]
    while time.monotonic() < deadline:
        _check_exits(procs)
        if chief.poll() is not None:
            raise SweepFailed(f"the chief (pid {chief.pid}) exited before "
                              "serving the oracle")
        try:
            with socket.create_connection((host, port), timeout=poll_s):
                return
        except socket.gaierror as err:
            raise SweepFailed(f"cannot resolve the chief's host {host!r}: "
                              f"{err.strerror}") from None
        except OSError:
            pass  # not serving yet
        time.sleep(poll_s)
    raise SweepFailed(f"the chief did not open port {port} in {timeout_s} s")
