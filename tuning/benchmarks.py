"""The benchmark models: one table, name -> builder, loader, settings.

Builders return uncompiled models; `tuning.hypermodel` compiles them with
AdamPlus. Settings follow the paper's Section 6 (see README); the `quick`
setting is CPU-sized, for tests and short sweeps.
"""

import dataclasses
from typing import Callable

import keras
from keras import layers, ops

from tuning import datasets

MNIST_DATASETS = ("mnist", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a benchmark is trained: batch size, epochs and data subset."""

    batch_size: int
    epochs: int
    subset: float | int | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark model of the table.

    Attributes:
        name: Key in `BENCHMARKS`, the CLI's `--benchmark`.
        description: One line for reports.
        build: `build(input_shape) -> keras.Model`, uncompiled.
        load: `load(dataset=..., idx_dir=..., arrays=...) -> Data`;
            `arrays` injects `((x, y), (x_test, y_test))` in place of the
            real files (tests use generated stand-ins of the same shapes).
        loss: Loss given to `compile`.
        metrics: Metrics given to `compile`.
        paper: The paper's setting.
        quick: A small CPU setting.
        inverse_sqrt_lr: Whether alpha decays as alpha/sqrt(t) (Section 6.1).
        datasets: Dataset choices (`--dataset`), first is the default.
    """

    name: str
    description: str
    build: Callable
    load: Callable
    loss: object
    metrics: tuple
    paper: Setting
    quick: Setting
    inverse_sqrt_lr: bool = False
    datasets: tuple = ()


def digits_mlp(input_shape):
    """64 -> 64 ReLU -> 10 softmax, for scikit-learn's digits."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ], name="digits_mlp")


def logistic_regression(l2=1e-4, input_dropout=0.0, classes=10):
    """L2-regularised (multiclass) logistic regression (Section 6.1)."""

    def build(input_shape):
        model = keras.Sequential(name="logistic_regression")
        model.add(keras.Input(input_shape))
        if input_dropout:
            model.add(layers.Dropout(input_dropout))
        model.add(layers.Dense(
            1 if classes == 2 else classes,
            activation="sigmoid" if classes == 2 else "softmax",
            kernel_regularizer=keras.regularizers.L2(l2),
        ))
        return model

    return build


def mnist_mlp(input_shape, hidden=1000, dropout=0.5):
    """Two hidden layers of 1000 ReLU with dropout (Section 6.2)."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Dense(hidden, activation="relu"),
        layers.Dropout(dropout),
        layers.Dense(hidden, activation="relu"),
        layers.Dropout(dropout),
        layers.Dense(10, activation="softmax"),
    ], name="mnist_mlp")


def cifar10_cnn(input_shape, input_dropout=0.2, dropout=0.5):
    """c64-c64-c128-1000 (Section 6.3): 5x5 convs, 3x3/2 max-pools."""
    model = keras.Sequential(name="cifar10_cnn")
    model.add(keras.Input(input_shape))
    model.add(layers.Dropout(input_dropout))
    for filters in (64, 64, 128):
        model.add(layers.Conv2D(filters, 5, padding="same",
                                activation="relu"))
        model.add(layers.MaxPooling2D(3, strides=2, padding="same"))
    model.add(layers.Flatten())
    model.add(layers.Dense(1000, activation="relu"))
    model.add(layers.Dropout(dropout))
    model.add(layers.Dense(10, activation="softmax"))
    return model


@keras.saving.register_keras_serializable(package="tuning")
class GaussianSample(layers.Layer):
    """z = mu + exp(log_var / 2) * noise; adds the KL term to the loss."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        mu, log_var = inputs
        kl = -0.5 * ops.sum(1 + log_var - ops.square(mu) - ops.exp(log_var),
                            axis=-1)
        self.add_loss(ops.mean(kl))
        noise = keras.random.normal(ops.shape(mu), seed=self.seed_generator)
        return mu + ops.exp(0.5 * log_var) * noise

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="tuning")
def bernoulli_nll(y_true, logits):
    """Per-example Bernoulli negative log-likelihood summed over pixels."""
    per_pixel = keras.losses.binary_crossentropy(
        y_true[..., None], logits[..., None], from_logits=True
    )
    return ops.sum(per_pixel, axis=-1)


def mnist_vae(input_shape, hidden=500, latent=50):
    """VAE of Section 6.4: 500 softplus units, 50-d Gaussian latent.

    The loss (reconstruction NLL + KL) is the negative ELBO in nats.
    """
    x = keras.Input(input_shape)
    h = layers.Dense(hidden, activation="softplus")(x)
    mu = layers.Dense(latent)(h)
    log_var = layers.Dense(latent)(h)
    z = GaussianSample(seed=0)([mu, log_var])
    h2 = layers.Dense(hidden, activation="softplus")(z)
    logits = layers.Dense(input_shape[-1])(h2)
    return keras.Model(x, logits, name="mnist_vae")


def _mnist(loader):
    def load(dataset="mnist", idx_dir=None, arrays=None):
        return loader(dataset=dataset, idx_dir=idx_dir, arrays=arrays)

    return load


def _no_dataset_choice(loader):
    def load(dataset=None, idx_dir=None, arrays=None):
        return loader(arrays=arrays)

    return load


def _digits(dataset=None, idx_dir=None, arrays=None):
    return datasets.digits()


CLASSIFY = ("sparse_categorical_crossentropy", ("accuracy",))

BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark(
            "digits", "MLP 64-64-10 on scikit-learn's digits (embedded)",
            digits_mlp, _digits, *CLASSIFY,
            paper=Setting(32, 30), quick=Setting(32, 8),
        ),
        Benchmark(
            "mnist_logreg", "logistic regression 784-10, L2 1e-4 (6.1)",
            logistic_regression(), _mnist(datasets.mnist_flat), *CLASSIFY,
            paper=Setting(128, 45), quick=Setting(128, 3, 6000),
            inverse_sqrt_lr=True, datasets=MNIST_DATASETS,
        ),
        Benchmark(
            "mnist_mlp", "MLP 784-1000-1000-10 ReLU, dropout 0.5 (6.2)",
            mnist_mlp, _mnist(datasets.mnist_flat), *CLASSIFY,
            paper=Setting(128, 200), quick=Setting(128, 3, 6000),
            datasets=MNIST_DATASETS,
        ),
        Benchmark(
            "imdb_bow_logreg",
            "logistic regression on 10,000-word bags, 50% input dropout (6.1)",
            logistic_regression(input_dropout=0.5, classes=2),
            _no_dataset_choice(datasets.imdb_bag_of_words),
            "binary_crossentropy", ("accuracy",),
            paper=Setting(128, 160), quick=Setting(128, 3, 5000),
            inverse_sqrt_lr=True,
        ),
        Benchmark(
            "cifar10_cnn", "CNN c64-c64-c128-1000, whitened input (6.3)",
            cifar10_cnn, _no_dataset_choice(datasets.cifar10_whitened),
            *CLASSIFY, paper=Setting(128, 45), quick=Setting(128, 2, 2000),
        ),
        Benchmark(
            "mnist_vae", "VAE 784-500-50 softplus, negative ELBO (6.4)",
            mnist_vae, _mnist(datasets.mnist_autoencode), bernoulli_nll, (),
            paper=Setting(100, 100), quick=Setting(100, 3, 6000),
            datasets=MNIST_DATASETS,
        ),
    ]
}


def get(name):
    """Returns the benchmark called `name`, or raises naming the choices."""
    if name not in BENCHMARKS:
        raise ValueError(
            f"Argument `benchmark` must be one of {', '.join(BENCHMARKS)}. "
            f"Received: benchmark={name!r}"
        )
    return BENCHMARKS[name]
