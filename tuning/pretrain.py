"""Pretrained backbones of the fine-tuning benchmarks: once per seed, cached.

A fine-tuning benchmark (`Benchmark.pretrain` set) trains its own model on
the pretraining set (`Data.pretrain`, e.g. MNIST) with AdamPlus at the
paper's defaults; every layer but the head is the backbone that each trial
(and each seed of `--confirm`) fine-tunes, under a new head. Pretraining
depends on the seed alone, not on the trial: every trial of a seed starts
from the same backbone, and two searches with the same `--seed` (one
learning rate, then layer-wise decay) fine-tune the same backbones.

The weights are kept in memory and in
`$KERAS_HOME/tuning_pretrained/<benchmark>-<key>.npz` (written
atomically), where `key` hashes what decides them: the data, the seed, the
pretraining setting, the backend, and the versions of Keras and of this
package (whose AdamPlus pretrains).
"""

import dataclasses
import hashlib
import json
import sys

import numpy as np

from tuning import datasets, rundir, seeds

FOLDER = "tuning_pretrained"
_MEMORY = {}


def backbone(benchmark, input_shape, source, seed):
    """The backbone's weights (NumPy arrays) pretrained for `seed`.

    Args:
        benchmark: A `tuning.benchmarks.Benchmark` with a `pretrain`
            setting.
        input_shape: Shape of one example.
        source: The pretraining set `(x, y)`.
        seed: The trial's seed.
    """
    if source is None:
        raise ValueError(f"Benchmark {benchmark.name} fine-tunes a "
                         "pretrained backbone: pass its pretraining set "
                         "(`Data.pretrain`) as `source`")
    key = _key(benchmark, input_shape, source, seed)
    if key in _MEMORY:
        return _MEMORY[key]
    path = datasets.keras_home() / FOLDER / f"{benchmark.name}-{key}.npz"
    weights = _read(path)
    if weights is None:
        weights = _train(benchmark, input_shape, source, seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_arrays(path, weights)
        except (OSError, rundir.DirectoryUnusable) as err:
            print(f"warning: the pretrained backbone is not cached ({err})",
                  file=sys.stderr, flush=True)
    _MEMORY[key] = weights
    return weights


def _read(path):
    try:
        with np.load(path) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]
    except (OSError, ValueError, KeyError):  # absent or damaged: retrain
        return None


def _train(benchmark, input_shape, source, seed):
    import keras

    from keras_adam_plus import AdamPlus
    from tuning import models

    setting = benchmark.pretrain
    x, y = _subset(source, setting.subset, seed)
    keras.utils.set_random_seed(seeds.derive(seed, "pretrain"))
    model = benchmark.build(input_shape)
    model.compile(optimizer=AdamPlus(), loss=benchmark.loss)
    model.fit(x, y, batch_size=setting.batch_size, epochs=setting.epochs,
              verbose=0)
    return [np.asarray(w) for w in models.backbone_weights(model)]


def _subset(source, subset, seed):
    x, y = source
    if subset is None or subset >= len(x):
        return x, y
    rng = np.random.default_rng(seeds.derive(seed, "pretrain data"))
    keep = np.sort(rng.permutation(len(x))[:subset])
    return x[keep], y[keep]


def _key(benchmark, input_shape, source, seed):
    """A hash of everything that decides the pretrained weights."""
    import keras

    import keras_adam_plus

    digest = hashlib.sha256()
    for array in source:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps([
        benchmark.name, list(input_shape), int(seed),
        dataclasses.astuple(benchmark.pretrain), keras.backend.backend(),
        keras.__version__, keras_adam_plus.__version__]).encode())
    return digest.hexdigest()[:16]
