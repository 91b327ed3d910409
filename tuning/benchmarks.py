"""The benchmark models: one table, name -> builder, loader, settings.

Builders return uncompiled models (`tuning.models`, imported with Keras
when a model is first built: the table itself loads no Keras, so the command
line checks its arguments against it at once); `tuning.hypermodel` compiles
them with AdamPlus. Settings follow the paper's Section 6 (see README); the
`quick` setting is CPU-sized, for tests and short sweeps.
"""

import dataclasses
from typing import Callable

from tuning import datasets

MNIST_DATASETS = ("mnist", "fashion_mnist")
SCALES = ("quick", "paper")


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
        layerwise: Whether the model has two or more layers with
            variables, so that `layer_decay` and `head_multiplier` can be
            tuned (a logistic regression has one).
        pretrain: For a fine-tuning benchmark, how its model is first
            trained on the loader's pretraining set (`Data.pretrain`), once
            per seed (`tuning.pretrain`); each trial then fine-tunes every
            layer of it under a new head. None: trials train from scratch.
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
    layerwise: bool = True
    pretrain: Setting | None = None

    def setting(self, scale):
        """The `Setting` of `scale` ("quick" or "paper")."""
        if scale not in SCALES:
            raise ValueError(f"Argument `scale` must be one of "
                             f"{', '.join(SCALES)}. Received: scale={scale!r}")
        return {"quick": self.quick, "paper": self.paper}[scale]

    @property
    def schedule(self):
        """The learning-rate schedule trials train with: a key of
        `tuning.search_space.SCHEDULES`, or None for a constant rate."""
        return "inverse_sqrt" if self.inverse_sqrt_lr else None

    def objectives(self):
        """The names `fit` logs with validation data: possible objectives."""
        names = ("loss", *self.metrics)
        return (*names, *(f"val_{name}" for name in names))


def _from_models(name, **fixed):
    """`tuning.models.<name>` with `fixed` keyword arguments, imported (and
    Keras with it) on the first call."""

    def call(*args, **kwargs):
        from tuning import models

        return getattr(models, name)(*args, **fixed, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`tuning.models.{name}`, imported on the first call."
    return call


digits_mlp = _from_models("digits_mlp")
mnist_mlp = _from_models("mnist_mlp")
cifar10_cnn = _from_models("cifar10_cnn")
mnist_vae = _from_models("mnist_vae")
finetune_cnn = _from_models("finetune_cnn")
bernoulli_nll = _from_models("bernoulli_nll")


def logistic_regression(l2=1e-4, input_dropout=0.0, classes=10):
    """The builder of an L2-regularised logistic regression (Section 6.1)."""
    return _from_models("logistic_regression", l2=l2,
                        input_dropout=input_dropout, classes=classes)


def _mnist(loader):
    def load(dataset="mnist", idx_dir=None, arrays=None):
        return loader(dataset=dataset, idx_dir=idx_dir, arrays=arrays)

    return load


def _no_dataset_choice(loader):
    def load(dataset=None, idx_dir=None, arrays=None):
        return loader(arrays=arrays)

    return load


def _mnist_to_fashion(dataset=None, idx_dir=None, arrays=None):
    return datasets.mnist_to_fashion(idx_dir=idx_dir, arrays=arrays)


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
            inverse_sqrt_lr=True, datasets=MNIST_DATASETS, layerwise=False,
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
            inverse_sqrt_lr=True, layerwise=False,
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
        Benchmark(
            "finetune_fashion",
            "CNN c16-c32-64 pretrained on MNIST, fine-tuned on "
            "Fashion-MNIST under a new head",
            finetune_cnn, _mnist_to_fashion, *CLASSIFY,
            paper=Setting(128, 10), quick=Setting(128, 3, 4000),
            pretrain=Setting(128, 2, 20000),
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
