"""The benchmark table: loaders, model shapes, stand-ins, clear errors.

imdb.npz and CIFAR-10 are not available offline here: their entries are
tested on generated stand-ins of the real shapes through the injectable
`arrays` loader argument. MNIST (IDX files) and Fashion-MNIST (Keras cache)
are tested for real when the offline files are linked under KERAS_HOME.
"""

import keras
import numpy as np
import pytest

from tuning import benchmarks, datasets, sweep
from tuning.search_space import SearchSpace


def _images(n, shape, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, classes, size=(n,), dtype=np.uint8)
    return x, y


def _imdb_sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    x = [list(rng.integers(1, 12000, size=rng.integers(5, 200)))
         for _ in range(n)]
    return x, rng.integers(0, 2, size=(n,))


STAND_INS = {
    "mnist_logreg": lambda: (_images(64, (28, 28)), _images(16, (28, 28))),
    "mnist_mlp": lambda: (_images(64, (28, 28)), _images(16, (28, 28))),
    "mnist_vae": lambda: (_images(64, (28, 28)), _images(16, (28, 28))),
    "imdb_bow_logreg": lambda: (_imdb_sequences(64), _imdb_sequences(16)),
    # Fashion-MNIST's stand-in; its training part also stands in for the
    # MNIST the backbone is pretrained on.
    "finetune_fashion": lambda: (_images(64, (28, 28)),
                                 _images(16, (28, 28))),
    "cifar10_cnn": lambda: (
        (_images(64, (32, 32, 3))[0], _images(64, (1,))[1].reshape(-1, 1)),
        (_images(16, (32, 32, 3))[0], _images(16, (1,))[1].reshape(-1, 1)),
    ),
}
SHAPES = {"digits": (64,), "mnist_logreg": (784,), "mnist_mlp": (784,),
          "mnist_vae": (784,), "imdb_bow_logreg": (10000,),
          "cifar10_cnn": (32, 32, 3), "finetune_fashion": (28, 28, 1)}
PARAMS = {"digits": 64 * 64 + 64 + 650, "mnist_logreg": 7850,
          "mnist_mlp": 785000 + 1001000 + 10010, "imdb_bow_logreg": 10001,
          # 784-500 encoder, two 500-50 heads, 50-500-784 decoder.
          "mnist_vae": 392500 + 2 * 25050 + 25500 + 392784,
          # conv1 3x3x1x16, conv2 3x3x16x32, features 1568-64, head 64-10.
          "finetune_fashion": 160 + 4640 + 100416 + 650}


@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_each_benchmark_loads_builds_and_trains(name):
    bench = benchmarks.get(name)
    arrays = STAND_INS[name]() if name in STAND_INS else None
    data = bench.load(dataset=(bench.datasets or (None,))[0], arrays=arrays)
    assert data.x_train.shape[1:] == SHAPES[name]
    assert data.x_train.dtype == np.float32
    model = bench.build(data.x_train.shape[1:])
    if name in PARAMS:
        assert model.count_params() == PARAMS[name]
    # `layerwise` (layer_decay may be tuned) says what the model holds.
    owning = [layer for layer in model.layers if layer.trainable_weights]
    assert bench.layerwise == (len(owning) >= 2)
    assert (data.pretrain is not None) == (bench.pretrain is not None)
    model.compile(optimizer="sgd", loss=bench.loss)
    loss = model.train_on_batch(data.x_train[:16], data.y_train[:16])
    assert np.isfinite(np.ravel(loss)[0])
    assert bench.quick.epochs <= bench.paper.epochs


def test_cifar_input_is_whitened():
    (x, y), (xt, yt) = STAND_INS["cifar10_cnn"]()
    data = datasets.cifar10_whitened(arrays=((x, y), (xt, yt)), epsilon=1e-3)
    flat = data.x_train.reshape(len(x), -1)
    assert abs(flat.mean()) < 1e-3
    assert data.y_train.shape == (64,)


def test_imdb_bag_of_words_is_multi_hot_below_num_words():
    seqs = ([[1, 5, 5, 10999], [2]], [0, 1])
    data = datasets.imdb_bag_of_words(arrays=(seqs, seqs))
    assert data.x_train.shape == (2, 10000)
    assert data.x_train[0].sum() == 2 and data.x_train[0, 5] == 1


@pytest.mark.quick
def test_sweep_runs_on_a_stand_in(tmp_path):
    result = sweep(benchmark="mnist_logreg", max_trials=2, epochs=1,
                   directory=tmp_path, arrays=STAND_INS["mnist_logreg"](),
                   space=SearchSpace(tune=("learning_rate",)), plots=False)
    assert [t["status"] for t in result.trials] == ["COMPLETED"] * 2


def _offline(path):
    return (datasets.keras_home() / "datasets" / path).exists()


@pytest.mark.skipif(not _offline("mnist-idx/train-images-idx3-ubyte.gz"),
                    reason="MNIST IDX files are not linked under KERAS_HOME")
def test_real_mnist_from_idx_files():
    data = datasets.mnist_flat()
    assert data.x_train.shape == (60000, 784)
    assert data.x_val.shape == (10000, 784)
    assert np.bincount(data.y_train).tolist()[:3] == [5923, 6742, 5958]
    assert 0.0 <= data.x_train.min() and data.x_train.max() == 1.0
    small = data.subset(0.1)
    assert small.x_train.shape == (6000, 784)
    assert small.x_val.shape == (1200, 784)


@pytest.mark.skipif(not _offline("fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Fashion-MNIST is not linked under KERAS_HOME")
def test_real_fashion_mnist_from_keras_cache():
    data = datasets.mnist_flat(dataset="fashion_mnist")
    assert data.x_train.shape == (60000, 784)
    assert np.bincount(data.y_train).tolist() == [6000] * 10


@pytest.mark.skipif(not (
    _offline("fashion-mnist/train-images-idx3-ubyte.gz")
    and _offline("mnist-idx/train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST or the MNIST IDX files are not linked under "
    "KERAS_HOME")
def test_real_mnist_to_fashion_pretrains_on_mnist():
    data = datasets.mnist_to_fashion()
    assert data.x_train.shape == (60000, 28, 28, 1)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    x, y = data.pretrain
    assert x.shape == (60000, 28, 28, 1)
    assert np.bincount(y).tolist()[:3] == [5923, 6742, 5958]
    assert data.subset(0.1).pretrain is data.pretrain


def test_missing_dataset_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    from keras.src.datasets import imdb

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(imdb, "get_file", offline)
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.imdb_bag_of_words()
    message = str(err.value)
    assert "Dataset 'imdb' is not cached" in message
    assert "place imdb.npz in" in message and str(tmp_path) in message


def test_offline_no_download_is_attempted(monkeypatch, tmp_path, capsys):
    # Was: Keras printed "Downloading data from ..." before each NOT RUN.
    import socket

    from keras.src.datasets import imdb

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    fetched = []
    monkeypatch.setattr(imdb, "get_file", lambda *a, **k: fetched.append(a))

    def unreachable(address, *args, **kwargs):
        raise OSError(f"no route to {address[0]}")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.imdb_bag_of_words()
    assert fetched == [] and capsys.readouterr().out == ""
    assert ("(OSError: no route to storage.googleapis.com). Without a "
            "network, place imdb.npz in") in str(err.value)


@pytest.mark.quick
def test_bad_subset_and_unknown_names_are_refused():
    data = datasets.digits()
    with pytest.raises(ValueError, match="Argument `subset` must be"):
        data.subset(-2)
    with pytest.raises(ValueError, match="Argument `benchmark` must be one"):
        benchmarks.get("resnet")
    with pytest.raises(ValueError, match="Argument `dataset` must be one"):
        datasets.load_mnist_arrays("kmnist")
    assert keras.backend.backend() in ("tensorflow", "jax", "torch")
