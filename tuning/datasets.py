"""Data loaders for the benchmark models.

Every loader returns a `Data` of float32 NumPy arrays. Real data come from
`keras.datasets.*.load_data()` (which reads `$KERAS_HOME/datasets/` before it
downloads) or, for MNIST, from the four LeCun IDX files. A dataset that is not
there and cannot be downloaded raises `DatasetUnavailable` saying which file
to place where.
"""

import contextlib
import dataclasses
import gzip
import math
import numbers
import os
import socket
from pathlib import Path

import numpy as np

from tuning.errors import TuningError, quoted

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DatasetUnavailable(TuningError, RuntimeError):
    """A dataset is neither cached nor downloadable; the message says how."""


@dataclasses.dataclass
class Data:
    """Training and validation arrays of one benchmark."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    source: str = ""
    # A fine-tuning benchmark's pretraining set, (x, y), or None.
    pretrain: tuple | None = None

    def subset(self, subset, seed=0):
        """Keeps a fixed random part: a fraction in (0, 1] or a count.

        The validation set shrinks by the same fraction (at least 1/5 of
        the kept training examples, when the validation set has that many).
        """
        subset = check_subset(subset)
        if subset is None:
            return self
        n = len(self.x_train)
        if isinstance(subset, float):
            keep = max(1, int(round(subset * n)))
        else:
            keep = min(n, subset)
        keep_val = min(len(self.x_val),
                       max(keep // 5, int(round(keep / n * len(self.x_val)))))
        rng = np.random.default_rng(seed)
        train = np.sort(rng.permutation(n)[:keep])
        val = np.sort(rng.permutation(len(self.x_val))[:keep_val])
        return Data(self.x_train[train], self.y_train[train],
                    self.x_val[val], self.y_val[val],
                    f"{self.source} (subset {keep}/{n})", self.pretrain)


# The largest count: what fits a C int, as for every other count.
MAX_COUNT = 2**31 - 1
SUBSET_RULE = f"a fraction in (0, 1] or a whole count in [1, {MAX_COUNT}]"


def check_subset(subset):
    """`subset` as a float fraction in (0, 1] or an int count, or None.

    A whole number above 1 is a count (`2.0` -> `2`); anything else, such
    as 0, -1, 2.5, NaN or Inf, raises ValueError. NumPy numbers are
    accepted.
    """
    if subset is None:
        return None
    if isinstance(subset, numbers.Real) and not isinstance(subset, bool) and (
        math.isfinite(subset)
    ):
        if 0 < subset <= 1 and not isinstance(subset, numbers.Integral):
            return float(subset)
        if 1 <= subset <= MAX_COUNT and subset == int(subset):
            return int(subset)
    raise ValueError(f"Argument `subset` must be {SUBSET_RULE}. "
                     f"Received: subset={subset!r}")


def keras_home():
    """Keras's cache folder: `$KERAS_HOME` or `~/.keras`."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


@contextlib.contextmanager
def _socket_timeout(seconds):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# Keras's datasets: what its cache holds once downloaded (glob patterns
# under $KERAS_HOME/datasets/), and the host it downloads from.
KERAS_CACHE = {
    "mnist": (("mnist.npz",), "storage.googleapis.com"),
    "fashion_mnist": (("fashion-mnist/train-images-idx3-ubyte.gz",),
                      "storage.googleapis.com"),
    "imdb": (("imdb.npz",), "storage.googleapis.com"),
    "cifar10": (("cifar-10-batches-py*", "cifar-10-python.tar.gz*"),
                "www.cs.toronto.edu"),
}


def keras_dataset(name, files, **kwargs):
    """Calls `keras.datasets.<name>.load_data(**kwargs)` or explains.

    `files` names what must sit under `$KERAS_HOME/datasets/` offline. A
    dataset that is not cached, when its host cannot be reached, is
    refused at once: no download is attempted (Keras would print
    "Downloading data from ..." and fail).
    """
    import keras

    where = keras_home() / "datasets"
    patterns, host = KERAS_CACHE.get(name, ((), None))
    cached = any(any(where.glob(p)) for p in patterns)
    try:
        if host and not cached:
            with _socket_timeout(5):
                socket.create_connection((host, 443)).close()
        with _socket_timeout(60):
            return getattr(keras.datasets, name).load_data(**kwargs)
    except Exception as err:  # keras raises bare Exception on fetch failure
        raise DatasetUnavailable(
            f"Dataset '{name}' is not cached and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"Without a network, place {files} in {where}/ "
            "(or set KERAS_HOME to a folder whose datasets/ holds it)."
        ) from None


def read_idx(path):
    """Reads one (gzipped) IDX file into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic not in (2049, 2051):
        raise ValueError(
            f"{quoted(path)} is not a uint8 IDX file (magic {magic})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                  for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_idx_dirs(idx_dir=None):
    """Folders searched for the four MNIST IDX files, in order."""
    dirs = [idx_dir, os.environ.get("MNIST_IDX_DIR"),
            keras_home() / "datasets" / "mnist-idx"]
    return [Path(d) for d in dirs if d]


def load_mnist_arrays(dataset="mnist", idx_dir=None):
    """((x_train, y_train), (x_test, y_test)) uint8 for MNIST-shaped sets.

    `dataset="mnist"` reads the LeCun IDX files from the first folder of
    `mnist_idx_dirs(idx_dir)` that holds all four, else
    `keras.datasets.mnist.load_data()`; `"fashion_mnist"` uses
    `keras.datasets.fashion_mnist.load_data()`.
    """
    if dataset == "fashion_mnist":
        return keras_dataset(
            "fashion_mnist",
            "the four Fashion-MNIST .gz files (in a fashion-mnist/ subfolder)",
        )
    if dataset != "mnist":
        raise ValueError(
            'Argument `dataset` must be one of "mnist", "fashion_mnist". '
            f"Received: dataset={dataset!r}"
        )
    for folder in mnist_idx_dirs(idx_dir):
        if all((folder / f).is_file() for f in IDX_FILES):
            arrays = [read_idx(folder / f) for f in IDX_FILES]
            return (arrays[0], arrays[1]), (arrays[2], arrays[3])
    return keras_dataset(
        "mnist",
        f"mnist.npz, or the four LeCun files {', '.join(IDX_FILES)} in a "
        "mnist-idx/ subfolder (or pass --mnist-idx DIR / set MNIST_IDX_DIR)",
    )


def digits():
    """scikit-learn's 8x8 digits (1,797 images, shipped with sklearn)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    return Data(x[:1397], y[:1397], x[1397:], y[1397:], "sklearn digits")


def mnist_flat(dataset="mnist", idx_dir=None, arrays=None):
    """MNIST-shaped images as (n, 784) floats in [0, 1] with int labels."""
    (x, y), (xt, yt) = arrays or load_mnist_arrays(dataset, idx_dir)
    return Data(_flat(x), y.astype("int32"), _flat(xt), yt.astype("int32"),
                dataset)


def mnist_to_fashion(idx_dir=None, arrays=None):
    """Fashion-MNIST as (n, 28, 28, 1) floats in [0, 1], with MNIST's
    training images as the pretraining set (`Data.pretrain`).

    `arrays` replaces both (its training part is the pretraining set).
    """
    (x, y), (xt, yt) = arrays or load_mnist_arrays("fashion_mnist")
    (xs, ys), _ = arrays or load_mnist_arrays("mnist", idx_dir)
    return Data(_images(x), y.astype("int32"), _images(xt),
                yt.astype("int32"), "mnist -> fashion_mnist",
                (_images(xs), ys.astype("int32")))


def _images(images):
    return (images.reshape(len(images), 28, 28, 1) / 255.0).astype(
        "float32")


def mnist_autoencode(dataset="mnist", idx_dir=None, arrays=None):
    """(n, 784) floats in [0, 1] as both input and target (for the VAE)."""
    (x, _), (xt, _) = arrays or load_mnist_arrays(dataset, idx_dir)
    x, xt = _flat(x), _flat(xt)
    return Data(x, x, xt, xt, dataset)


def _flat(images):
    return (images.reshape(len(images), -1) / 255.0).astype("float32")


def imdb_bag_of_words(num_words=10000, arrays=None):
    """IMDB reviews as multi-hot bags of the `num_words` most frequent words.

    Needs `imdb.npz` (keras.datasets.imdb); full size takes ~2 GB as float32.
    """
    (x, y), (xt, yt) = arrays or keras_dataset(
        "imdb", "imdb.npz", num_words=num_words
    )
    return Data(_multi_hot(x, num_words), np.asarray(y, "float32"),
                _multi_hot(xt, num_words), np.asarray(yt, "float32"), "imdb")


def _multi_hot(sequences, num_words):
    out = np.zeros((len(sequences), num_words), "float32")
    for row, words in enumerate(sequences):
        words = np.asarray(words, "int64")
        out[row, words[words < num_words]] = 1.0
    return out


def cifar10_whitened(arrays=None, epsilon=0.1, max_fit=10000):
    """CIFAR-10 with ZCA-whitened input (the paper's Section 6.3).

    The whitening matrix is fitted on at most `max_fit` training images.
    """
    (x, y), (xt, yt) = arrays or keras_dataset(
        "cifar10", "cifar-10-python.tar.gz (saved as "
        "cifar-10-batches-py-target_archive)",
    )
    x = np.asarray(x, "float32").reshape(len(x), -1) / 255.0
    xt = np.asarray(xt, "float32").reshape(len(xt), -1) / 255.0
    mean = x.mean(axis=0)
    fit = x[:max_fit] - mean
    cov = fit.T @ fit / len(fit)
    values, vectors = np.linalg.eigh(cov.astype("float64"))
    zca = (vectors / np.sqrt(values + epsilon)) @ vectors.T
    zca = zca.astype("float32")

    def whiten(a):
        return ((a - mean) @ zca).reshape(len(a), 32, 32, 3)

    return Data(whiten(x), np.asarray(y, "int32").reshape(-1), whiten(xt),
                np.asarray(yt, "int32").reshape(-1), "cifar10 (ZCA)")
