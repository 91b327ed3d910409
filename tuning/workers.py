"""The guard rails of a parallel search: its bound, its devices, its roles.

Everything here runs before Keras is imported (it imports no framework), so
`--workers 100000` is refused in a fraction of a second with nothing
started and nothing written.

- `bound()`: how many workers this machine holds: one per visible GPU, or
  one per usable CPU core without GPUs, and no more than the available
  memory covers at `WORKER_MIB` each (plus the chief).
- `visible_devices()`: the GPUs a child could see, found without importing
  a framework (`TUNING_FAKE_DEVICES` fakes them for tests).
- `child_env()`: the environment of the chief and of worker i: keras-tuner's
  three variables, worker i's one device (`CUDA_VISIBLE_DEVICES`, which
  TensorFlow, JAX and torch all honour), none for the chief, and the
  launcher's pid that the child watches.
- `watch_launcher()`: run at a child's start; the child exits within
  seconds once its launcher is gone, whatever stopped it.
- `parse_address()`: `HOST:PORT` of `--chief` and `--join`.
"""

import ctypes
import numbers
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# A worker imports a Keras backend (TensorFlow alone keeps some hundreds of
# MiB resident) and trains one model on its data; the chief imports Keras
# and keras-tuner too. 1 GiB each leaves headroom for the quick-scale
# benchmarks; the bound refuses what would make the machine swap, not what
# would merely be tight.
WORKER_MIB = 1024
# Tests set this to a comma-separated device list ("" for none) in place
# of the machine's GPUs.
FAKE_DEVICES = "TUNING_FAKE_DEVICES"
# Set by the launcher in its children: its pid, which they watch.
LAUNCHER_PID = "TUNING_LAUNCHER_PID"
# Set by the launcher in worker i: the device it was given ("cpu": none).
DEVICE = "TUNING_DEVICE"
# How often a child checks that its launcher is alive.
WATCH_S = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def usable_cores():
    """The CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_mib():
    """Memory available to new processes, in MiB (Linux `MemAvailable`), or
    None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def visible_devices(environ=None):
    """The GPUs a child of this process would see, as CUDA names them.

    `TUNING_FAKE_DEVICES` (tests) wins; then `CUDA_VISIBLE_DEVICES` as CUDA
    reads it (up to its first invalid entry: "" and "-1" hide every GPU);
    then the NVIDIA driver's list (`/proc/driver/nvidia/gpus`, else
    `nvidia-smi -L`). No framework is imported.
    """
    environ = os.environ if environ is None else environ
    for name in (FAKE_DEVICES, "CUDA_VISIBLE_DEVICES"):
        if name in environ:
            devices = []
            for entry in environ[name].split(","):
                entry = entry.strip()
                if not entry or entry.startswith("-"):
                    break  # CUDA stops at the first invalid entry
                devices.append(entry)
            return devices
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return [str(i) for i in range(len(list(gpus.iterdir())))]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(
            line for line in out.splitlines() if line.startswith("GPU "))]
    return []


def bound(devices=None, cores=None, memory_mib=None):
    """(most workers, why): what this machine holds.

    Args:
        devices: The visible GPUs; defaults to `visible_devices()`.
        cores: Usable CPU cores; defaults to `usable_cores()`.
        memory_mib: Available memory in MiB; defaults to `available_mib()`
            (None: not limited by memory).
    """
    devices = visible_devices() if devices is None else devices
    cores = usable_cores() if cores is None else cores
    memory_mib = available_mib() if memory_mib is None else memory_mib
    if devices:
        most = len(devices)
        why = (f"{most} visible GPU{'s' if most != 1 else ''}, one worker "
               "each")
    else:
        most = cores
        why = (f"{most} usable CPU core{'s' if most != 1 else ''} and no "
               "GPU")
    if memory_mib is not None:
        fit = max(0, memory_mib // WORKER_MIB - 1)  # the chief takes one
        if fit < most:
            most = fit
            why = (f"{memory_mib / 1024:.1f} GiB of memory available, "
                   f"~{WORKER_MIB / 1024:g} GiB per worker plus the chief")
    return most, why


def check_workers(workers, devices=None, cores=None, memory_mib=None):
    """`workers` as a count: "auto" is the bound; a count above it is a
    ValueError in Keras's message shape, naming the bound and why."""
    most, why = bound(devices, cores, memory_mib)
    if workers == "auto":
        if most < 1:
            raise ValueError(f"Argument `workers` cannot be 'auto' here: no "
                             f"worker fits ({why}). Received: workers='auto'")
        return most
    if isinstance(workers, numbers.Integral) and not isinstance(workers,
                                                                 bool):
        workers = int(workers)  # NumPy integers too
    if isinstance(workers, bool) or not isinstance(workers, int) or (
        workers < 0
    ):
        raise ValueError("Argument `workers` must be an integer >= 0 or "
                         f"'auto'. Received: workers={workers!r}")
    if workers > most:
        raise ValueError(
            f"Argument `workers` must be at most {most} on this machine "
            f"({why}), or 'auto'. Received: workers={workers}")
    return workers


# ----------------------------------------------------------------- roles


ADDRESS_RULE = "HOST:PORT with a port in 1-65535"


def parse_address(text):
    """(host, port) of "HOST:PORT" (IPv6 in brackets); ValueError if not."""
    host, colon, port = str(text).rpartition(":")
    if ":" in host:
        # keras-tuner builds "host:port" strings that gRPC misreads for
        # IPv6 hosts.
        raise ValueError(f"must be {ADDRESS_RULE}: IPv6 addresses are not "
                         "supported, use a host name or an IPv4 address")
    if not colon or not host or not re.fullmatch(r"[0-9]{1,5}", port) or (
        not 1 <= int(port) <= 65535
    ):
        raise ValueError(f"must be {ADDRESS_RULE}")
    return host, int(port)


def joiner_id(hostname=None, pid=None):
    """A joining worker's keras-tuner id: `tuner-<host>-<pid>`.

    keras-tuner takes any id containing "chief" for the chief, so that
    word is spelled "chf" in a host name (a node `chief-01` joins as a
    worker).
    """
    hostname = socket.gethostname() if hostname is None else hostname
    pid = os.getpid() if pid is None else pid
    return f"tuner-{hostname.replace('chief', 'chf')}-{pid}"


def connect_host(host):
    """The address a local process dials to reach a server bound on
    `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def free_port(host="127.0.0.1"):
    """A TCP port free on `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(role, host, port, devices, base=None, launcher_pid=None):
    """The environment of the chief (`role` "chief") or of worker i
    (`role` i).

    keras-tuner's three variables; `CUDA_VISIBLE_DEVICES`: the i-th of
    `devices` for worker i, none for the chief (only where there are GPUs:
    a CPU machine's environment is left as it is); the launcher's pid,
    which the child watches (`watch_launcher`).
    """
    env = dict(os.environ if base is None else base)
    env.update(KERASTUNER_ORACLE_IP=str(host),
               KERASTUNER_ORACLE_PORT=str(port),
               **{LAUNCHER_PID: str(launcher_pid or os.getpid())})
    if role == "chief":
        env["KERASTUNER_TUNER_ID"] = "chief"
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env[DEVICE] = "none"
        return env
    env["KERASTUNER_TUNER_ID"] = f"tuner{role}"
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[role]
    env[DEVICE] = devices[role] if devices else "cpu"
    return env


def worker_label():
    """Who trains in this process: keras-tuner's tuner id, or "local" for a
    one-process search."""
    return os.environ.get("KERASTUNER_TUNER_ID") or "local"


def device_label():
    """The device(s) this process trains on: the one its launcher gave it,
    else the visible GPUs, else "cpu"."""
    return (os.environ.get(DEVICE) or ",".join(visible_devices())
            or "cpu")


# ----------------------------------------------------- dying with the launcher


def watch_launcher(environ=None, poll_s=WATCH_S):
    """Makes this child exit within seconds once its launcher is gone.

    Does nothing outside a child of our launcher (no `TUNING_LAUNCHER_PID`).
    On Linux the kernel sends SIGTERM when the parent dies
    (`prctl(PR_SET_PDEATHSIG)`); everywhere a daemon thread checks every
    `poll_s` seconds that the parent is still the launcher (an orphan is
    re-parented) and ends the process if not.
    """
    environ = os.environ if environ is None else environ
    launcher = environ.get(LAUNCHER_PID)
    if not launcher:
        return
    launcher = int(launcher)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the thread below still watches
    if os.getppid() != launcher:  # it died before prctl took effect
        _orphaned(launcher)

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        _orphaned(launcher)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _orphaned(launcher):
    print(f"launcher (pid {launcher}) is gone; stopping", file=sys.stderr,
          flush=True)
    os._exit(1)  # now, from any thread, without waiting on training
