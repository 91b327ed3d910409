"""Test-wide fixtures: fixed seeds and a clean Keras session per test."""

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _offline_keras_home():
    """Points KERAS_HOME at a temp folder linking ../shared/datasets.

    CI sets KERAS_HOME itself; this makes a plain `pytest` find the offline
    dataset files too. Keras reads KERAS_HOME when it is first imported, so
    this runs before any test imports keras.
    """
    shared = Path(__file__).resolve().parent.parent / "shared" / "datasets"
    if "KERAS_HOME" in os.environ or not shared.is_dir():
        return
    home = Path(tempfile.mkdtemp(prefix="keras_home_"))
    # Removed at exit (pytest-xdist's workers inherit KERAS_HOME and end
    # before the process that made it).
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    for source in shared.rglob("*"):
        if source.is_file() and source.suffix != ".md" and (
            source.name != "SHA256SUMS"
        ):
            target = home / "datasets" / source.relative_to(shared)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    os.environ["KERAS_HOME"] = str(home)


_offline_keras_home()


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="also run tests marked slow (long experiments)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow experiment: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import keras

    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seeded_clean_session():
    import keras

    # Keras's global state (layer names, settings; TensorFlow's graph and
    # kernel cache, torch's dynamo cache) is reset around every test, but
    # without `clear_session`'s full garbage collection (`free_memory`):
    # with TensorFlow's objects in the heap each one took about as long
    # as a typical test, twice per test, and Python's own collector still
    # frees cycles as it goes. (The tuner collects after each trial
    # itself, `tuning.tuners`.)
    keras.utils.clear_session(free_memory=False)
    random.seed(1234)
    np.random.seed(1234)
    keras.utils.set_random_seed(1234)
    yield
    keras.utils.clear_session(free_memory=False)

