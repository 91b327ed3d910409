"""The output directory of a search: atomic files, one owner, one setting.

- Every JSON, CSV and text file is written to a temporary file in the same
  folder and renamed over the old one (`os.replace` is atomic on POSIX), so
  a crash, an interrupt or a kill leaves the old file or the new one, never
  a truncated one.
- `lock(directory)` holds an exclusive `fcntl.flock` on `<dir>/.lock` for the
  duration of a search, and removes the file as it lets go; a second search
  on the same directory stops at once and says which process holds it.
  keras-tuner's chief and workers share a directory by design and do not
  lock it (their launcher does). A killed search (SIGKILL) leaves its
  .lock behind, unheld: the next search takes it.
- `check_settings` compares a new search with the one the directory holds
  (`settings.json`) and refuses to mix them.

This module imports no Keras: the command line runs these checks in a
fraction of a second, before TensorFlow loads.
"""

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from tuning.errors import TuningError, command, quoted
from tuning.search_space import NAMES

SETTINGS = "settings.json"
LOCK = ".lock"
# What a search wrote in its folder (names, top level): all that
# `--overwrite` removes.
MANIFEST = ".manifest.json"
# Our record of one trial, beside keras-tuner's trial.json.
SIDECAR = "adam_plus.json"
TEMP_SUFFIX = ".tmp"
# Settings that may change on a resume: max_trials may grow; the others
# describe rather than decide the trials (each trial's sidecar records the
# package versions that trained it).
_MAY_CHANGE = ("max_trials", "data", "project", "versions", "grid_points")


class DirectoryBusy(TuningError):
    """Another search holds the directory's lock."""


class DirectoryUnusable(TuningError):
    """The directory cannot be created or written."""


class SettingsMismatch(TuningError, ValueError):
    """The directory holds a search with other settings."""


class DamagedFile(TuningError):
    """A file of the run folder cannot be read; the message says what to do."""


class NoRun(TuningError):
    """The directory holds no search to report on."""


# ----------------------------------------------------------------- files


def write_text(path, text):
    """Writes `text` to `path` atomically (temporary file, then rename).

    An OS error (a full disk, a read-only folder) raises
    `DirectoryUnusable`: one line naming `path`.
    """
    def write(temp):
        with open(temp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def write_arrays(path, arrays):
    """Writes NumPy `arrays` to the .npz file `path` atomically
    (`numpy.load(path)["arr_0"]`... reads them back)."""
    import numpy as np

    def write(temp):
        with open(temp, "wb") as f:
            np.savez(f, *arrays)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def write_figure(figure, path, **kwargs):
    """Saves a matplotlib `figure` to `path` atomically."""
    path = Path(path)
    _atomic(path, lambda temp: figure.savefig(
        temp, format=path.suffix.lstrip("."), **kwargs))


def _atomic(path, write):
    """Calls `write(temp)`, then renames the temporary file over `path`;
    an OS error is `DirectoryUnusable` naming `path`."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as err:
        raise unusable(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def unusable(path, err):
    """The `DirectoryUnusable` of an OS error `err` on `path`."""
    return DirectoryUnusable(
        f"cannot write {quoted(path)}: {err.strerror or err}; free space or "
        "fix permissions, then rerun the same command to resume")


# What `write_text` names its temporary files: `.<name>.<pid>.tmp`.
_TEMPORARY = re.compile(r"^\..+\.[0-9]+" + re.escape(TEMP_SUFFIX) + "$")


def remove_temporary(directory, project=None):
    """Removes the temporary files a killed writer left in `directory` and
    its keras-tuner `project` folder's trial folders: only ours
    (`.<name>.<pid>.tmp`); a user's other files stay."""
    directory = Path(directory)
    if project is None:
        try:
            project = json.loads((directory / SETTINGS).read_text()).get(
                "project")
        except (OSError, ValueError, AttributeError):
            project = None
    folders = [directory]
    if isinstance(project, str) and project not in ("", ".", "..") and (
            "/" not in project):
        folders += [directory / project,
                    *(directory / project).glob("trial_*")]
    for folder in folders:
        for path in folder.glob(f".*{TEMP_SUFFIX}"):
            if _TEMPORARY.match(path.name) and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()


def note_written(directory, *names):
    """Adds `names` (entries of `directory`, files or folders, that a search
    wrote) to the folder's manifest, the list `clear` removes."""
    path = Path(directory) / MANIFEST
    try:
        saved = json.loads(path.read_text()).get("written", [])
    except (OSError, ValueError, AttributeError):
        saved = []
    written = sorted(set(saved) | set(names))
    if written != saved:
        write_json(path, {"written": written})


# Non-finite floats as strict JSON holds them: as strings (bare NaN and
# Infinity are not JSON; other readers refuse them).
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def write_json(path, obj, indent=1):
    """Writes `obj` as strict JSON to `path` atomically: a NaN or infinite
    float is written as the string "NaN", "Infinity" or "-Infinity"."""
    write_text(path, json.dumps(_encode(obj), indent=indent, allow_nan=False))


def _encode(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else (
            "Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    """`obj` read back: "NaN", "Infinity", "-Infinity" as floats (files of
    older versions hold bare NaN, which `json` reads as floats itself)."""
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def write_csv(path, header, rows):
    """Writes a CSV table (a header, then rows) to `path` atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_json(path, what="its contents are ignored"):
    """The JSON in `path`, or None (with a warning naming it) if unreadable.

    A missing file is None without a warning. A truncated or corrupt one
    (written by an older version, or damaged) warns on stderr, saying what
    becomes of it: `what`.
    """
    path = Path(path)
    try:
        return _decode(json.loads(path.read_text()))
    except (FileNotFoundError, NotADirectoryError):
        return None  # also a path under a file: nothing there
    except OSError as err:
        raise TuningError(
            f"cannot read {quoted(path)}: {err.strerror}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        print(f"warning: {quoted(path)} is truncated or corrupt ({err}); "
              f"{what}", file=sys.stderr, flush=True)
        return None


def read_json_strict(path, remedy):
    """The JSON in `path`, or None if it is missing; a file that cannot be
    read or parsed raises `DamagedFile`: one line naming it and `remedy`."""
    path = Path(path)
    try:
        return _decode(json.loads(path.read_text()))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = getattr(err, "strerror", None) or "truncated or corrupt"
        raise DamagedFile(
            f"{quoted(path)} is unreadable ({why}); {remedy}") from None


# ------------------------------------------------------------------ lock

_HELD = {}  # resolved directory -> [file descriptor, depth]


def is_distributed_child():
    """Whether this process is a keras-tuner chief or worker."""
    return bool(os.environ.get("KERASTUNER_TUNER_ID"))


@contextlib.contextmanager
def lock(directory):
    """Holds `directory` exclusively; creates it if needed.

    Re-entrant within one process. Raises `DirectoryBusy` naming the holder
    if another process has it, `DirectoryUnusable` if it cannot be created
    or written. Folders this call created are removed again on exit if
    nothing but the lock was written in them.
    """
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    created = _make_dirs(directory)
    path = directory / LOCK
    fd = _take(directory, path, created)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        # As the user typed it (was sys.argv: .../tuning/__main__.py ...).
        "command": " ".join([command(), *map(quoted, sys.argv[1:])]),
    }).encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        # Removed while still held, then released: a process that opened
        # the old file meanwhile finds it unlinked once it takes it, and
        # takes the new one instead (`_take`); so no folder keeps a .lock
        # after its search, and two processes never both hold it.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the flock
        if created and not any(directory.iterdir()):
            _remove_empty(created)


def _take(directory, path, created):
    """An open descriptor of `path` holding its exclusive flock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            _remove_empty(created)
            raise DirectoryUnusable(
                f"cannot write to directory {quoted(directory)}: "
                f"{err.strerror}; fix its permissions or choose another "
                "--directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryBusy(
                f"directory {quoted(directory)} is in use by "
                f"{_holder(path)}; wait for it to finish or choose another "
                "--directory") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it as it finished: the new one


def _same_file(fd, path):
    """Whether the open `fd` is the file at `path` now."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def running(directory):
    """Who runs a search in `directory` now (another process holding its
    lock: "pid N on HOST since ..."), or None."""
    directory = Path(directory)
    path = directory / LOCK
    if str(directory.resolve()) in _HELD:
        return None  # this process: its search is not running a trial now
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # releases a lock it took
    return None


def _holder(path):
    try:
        info = json.loads(Path(path).read_text())
        return (f"pid {info['pid']} on {info['host']} since {info['since']} "
                f"({info['command']})")
    except (OSError, ValueError, KeyError):
        return "another process"


def _make_dirs(directory):
    """Creates `directory` and its parents; the ones created, deepest first."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    if directory.exists() and not directory.is_dir():  # mkdir: "File exists"
        raise DirectoryUnusable(f"{quoted(directory)} is a file, not a "
                                "directory; choose another --directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DirectoryUnusable(
            f"cannot create directory {quoted(directory)}: {err.strerror}; "
            "choose another --directory"
        ) from None
    if not directory.is_dir():
        raise DirectoryUnusable(f"{quoted(directory)} is not a directory; "
                                "choose another --directory")
    return missing


def _remove_empty(folders):
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# -------------------------------------------------------------- settings


def read_settings(directory):
    """The settings of the search in `directory`; `NoRun` if there is none."""
    directory = Path(directory)
    settings = read_json_strict(
        directory / SETTINGS, "rerun the search's command with --overwrite "
        "to start afresh, or choose another --directory")
    _check_shape(directory, settings)
    if settings is None:
        raise NoRun(
            f"{quoted(directory)} holds no tuning run (no readable "
            f"{SETTINGS}); {_first(directory)}"
        )
    return settings


def _first(directory):
    """What to do first where `report` finds no search in `directory`: run
    one there, unless it is a file (no search can be run into it)."""
    if any(p.exists() and not p.is_dir()
           for p in (directory, *directory.parents)):
        return ("that is a file, not a folder: pass the folder a search "
                "wrote (the search's --directory)")
    return f"run `{command()} --directory {quoted(directory)}` first"


def check_settings(directory, settings, pending=()):
    """Refuses to resume a search saved with other settings.

    Compares `settings` with `<directory>/settings.json` key by key (keys
    in `pending` are not known yet and are skipped). A saved file that
    lacks a key that decides trials (an older version's layout) is refused:
    its trials would be labelled with settings they did not train with.
    `max_trials` may grow. Raises `SettingsMismatch` naming every
    difference and the two ways out.
    """
    directory = Path(directory)
    saved = read_json_strict(directory / SETTINGS,
                             "rerun with --overwrite to start afresh, or "
                             "choose another --directory")
    if saved is None:
        return
    _check_shape(directory, saved)
    there, now = saved.get("backend"), settings.get("backend")
    if there and now and there != now and "backend" not in pending:
        raise SettingsMismatch(
            f"{quoted(directory)} holds a search trained with "
            f"KERAS_BACKEND={there}, not {now}: rerun with "
            f"KERAS_BACKEND={there} to resume it, --overwrite to start "
            "afresh, or choose another --directory")
    missing = [key for key in _flatten(json.loads(json.dumps(settings)))
               if key not in _flatten(saved) and key not in _MAY_CHANGE
               and key not in pending]
    if missing:
        raise SettingsMismatch(
            f"{quoted(directory)} holds a search from an older version whose "
            f"settings lack {', '.join(missing)}: it cannot resume under "
            "these settings. Rerun with --overwrite to start afresh, or "
            "choose another --directory (`report` still reads it with its "
            "own settings)")
    differences = settings_differences(saved, settings, pending)
    if settings.get("max_trials", 0) < saved.get("max_trials", 0):
        differences.append(f"max_trials {saved['max_trials']} there, "
                           f"{settings['max_trials']} now (it may only grow)")
    if differences:
        raise SettingsMismatch(
            f"{quoted(directory)} holds a search with other settings: "
            + "; ".join(differences)
            + ". Rerun with --overwrite to start afresh, or choose another "
            "--directory"
        )


def _check_shape(directory, settings):
    """Raises `DamagedFile` if `settings` (read from `directory`) is not
    None and lacks what every version's settings hold."""
    if settings is not None and not (
        isinstance(settings, dict)
        and isinstance(settings.get("project"), str)
        and isinstance(settings.get("objective"), str)
    ):
        raise DamagedFile(
            f"{quoted(Path(directory) / SETTINGS)} is not a search's settings "
            "(damaged, or from another program); rerun with --overwrite to "
            "start afresh, or choose another --directory")


def settings_differences(saved, settings, pending=(), may_change=_MAY_CHANGE,
                         now="now"):
    """"KEY <saved> there, <new> now" for each setting that differs (keys
    in `pending` or `may_change`, or missing from `saved`, are skipped)."""
    new = json.loads(json.dumps(settings))  # tuples as lists, as saved
    flat_new, flat_saved = _flatten(new), _flatten(saved)
    return [
        f"{key} {flat_saved[key]!r} there, {value!r} {now}"
        for key, value in flat_new.items()
        if key not in may_change and key not in pending
        and key in flat_saved and flat_saved[key] != value
    ]


def _flatten(settings):
    """The search space's fields as top-level keys (`tune`, `modes`, ...),
    `tune` in its one order (older versions kept the order given)."""
    flat = {k: v for k, v in settings.items() if k != "space"}
    flat.update(settings.get("space", {}))
    if flat.get("subset") == 1.0 and isinstance(flat["subset"], float):
        flat["subset"] = None  # all the data, as saved before 1.0 meant it
    if isinstance(flat.get("tune"), list):
        flat["tune"] = [n for n in NAMES if n in flat["tune"]] + [
            n for n in flat["tune"] if n not in NAMES]
    return flat


def check_overwritable(directory):
    """Refuses (`DirectoryUnusable`, one line naming it) to `--overwrite` a
    folder that holds files but no search (no settings.json, no manifest):
    the user's files are not a search's to remove."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / SETTINGS).exists() or (
            directory / MANIFEST).exists():
        return
    theirs = [p.name for p in directory.iterdir()
              if p.name != LOCK and not _TEMPORARY.match(p.name)]
    if theirs:
        raise DirectoryUnusable(
            f"{quoted(directory)} holds files that no search wrote (no "
            f"{SETTINGS}): --overwrite removes only a search's files; "
            "choose another --directory")


def clear(directory, outputs):
    """Removes a previous search's files from `directory` (`--overwrite`).

    Removes only what the search wrote: the names its manifest lists (or,
    in a folder of a version that kept none, the keras-tuner project folder
    named in its settings and `outputs`, names or glob patterns). Other
    files in the directory are left alone.
    """
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST, "it is removed") or {}
    listed = manifest.get("written") if isinstance(manifest, dict) else None
    saved = read_json(directory / SETTINGS, "it is removed") or {}
    names = [SETTINGS, MANIFEST]
    if isinstance(saved, dict) and isinstance(saved.get("project"), str):
        names.append(saved["project"])
    doomed = []
    if isinstance(listed, list):
        names += [n for n in listed if isinstance(n, str)]
    else:
        for pattern in outputs:
            doomed.extend(directory.glob(pattern))
    doomed += [directory / n for n in names
               if n not in ("", ".", "..") and "/" not in n]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
