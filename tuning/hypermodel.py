"""A keras-tuner HyperModel: a benchmark compiled with AdamPlus from hp."""

import math

import keras
import keras_tuner

from keras_adam_plus import AdamPlus, InverseSqrtDecay
from tuning.errors import check_interrupt
from tuning.search_space import SearchSpace, with_variable_groups


class AdamPlusHyperModel(keras_tuner.HyperModel):
    """Builds `benchmark`'s model and compiles it with AdamPlus from `hp`.

    Args:
        benchmark: A `tuning.benchmarks.Benchmark`.
        input_shape: Shape of one example (without the batch axis).
        space: The `SearchSpace`. Defaults to `None`: `SearchSpace()`,
            the four hyperparameters of the paper.
        batch_size: Batch size of `fit`. Defaults to `32`.
        epochs: Epochs of `fit` (Hyperband overrides it per trial).
            Defaults to `1`.
        seed: Seed set before every build: every trial starts from the same
            initial weights and sees the same dropout masks and batches.
            Defaults to `0`.
        verbose: `fit`'s verbosity: 0 silent, 1 a progress bar, 2 one line
            per epoch. Defaults to `0`.
        pretrain_data: For a benchmark with a `pretrain` setting: the
            `(x, y)` its backbone is pretrained on
            (`tuning.datasets.Data.pretrain`), once per seed
            (`tuning.pretrain`). Defaults to `None` (required only by such
            a benchmark).
    """

    def __init__(self, benchmark, input_shape, space=None, batch_size=32,
                 epochs=1, seed=0, verbose=0, pretrain_data=None):
        super().__init__(name=benchmark.name)
        if batch_size < 1 or epochs < 1:
            raise ValueError(
                "Arguments `batch_size` and `epochs` must be >= 1. Received: "
                f"batch_size={batch_size}, epochs={epochs}"
            )
        self.benchmark = benchmark
        self.input_shape = tuple(input_shape)
        self.space = space or SearchSpace()
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.verbose = verbose
        self.pretrain_data = pretrain_data
        self.last_history = {}
        self.last_epochs = None
        # The variable_groups of the last optimizer built (None: none).
        self.last_variable_groups = None
        # Settings a subclass may change (tuning.replicate does).
        self.build_kwargs = {}
        self.inverse_sqrt_lr = benchmark.inverse_sqrt_lr
        self.metrics = tuple(benchmark.metrics)

    def build(self, hp):
        """Declares the search space on `hp`; returns the compiled model."""
        kwargs = self.declare(hp)
        build_kwargs = dict(self.build_kwargs)
        if self.benchmark.pretrain is not None:
            from tuning import pretrain

            build_kwargs["backbone"] = pretrain.backbone(
                self.benchmark, self.input_shape, self.pretrain_data,
                self.seed)
        keras.utils.set_random_seed(self.seed)
        model = self.benchmark.build(self.input_shape, **build_kwargs)
        # layer_decay, head_multiplier -> rules of this model's layers.
        kwargs = with_variable_groups(kwargs, model)
        self.last_variable_groups = kwargs.get("variable_groups")
        if self.inverse_sqrt_lr:
            kwargs["learning_rate"] = InverseSqrtDecay(kwargs["learning_rate"])
        model.compile(optimizer=self.make_optimizer(kwargs),
                      loss=self.benchmark.loss, metrics=list(self.metrics))
        return model

    def declare(self, hp):
        """Declares the search space on `hp`; the optimizer's kwargs."""
        return self.space.optimizer_kwargs(self.space.declare(hp))

    def make_optimizer(self, kwargs):
        """The optimizer of one trial: `AdamPlus(**kwargs)`."""
        return AdamPlus(**kwargs)

    def fit(self, hp, model, *args, **kwargs):
        """Trains; a non-finite loss raises `Diverged` instead of scoring.

        Records the per-epoch history (`last_history`) and the epochs the
        model has trained in all (`last_epochs`: Hyperband continues a
        trial from `initial_epoch`).
        """
        kwargs.setdefault("batch_size", self.batch_size)
        kwargs.setdefault("epochs", self.epochs)
        # keras-tuner hands search()'s verbose (which silences its own
        # display) on to fit: the hypermodel's decides.
        kwargs["verbose"] = self.verbose
        kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [
            keras.callbacks.TerminateOnNaN(), _Interruptible(),
        ]
        self.last_epochs = kwargs["epochs"]
        keras.utils.set_random_seed(self.seed)
        history = model.fit(*args, **kwargs)
        self.last_history = {k: [float(x) for x in v]
                             for k, v in history.history.items()}
        for name, values in self.last_history.items():
            bad = [i for i, x in enumerate(values) if not math.isfinite(x)]
            if not values:
                raise keras_tuner.errors.FailedTrialError(
                    f"{name} has no values: the trial trained no epoch"
                )
            if bad:
                raise Diverged(
                    f"{name} became non-finite ({values[bad[0]]}) at epoch "
                    f"{bad[0] + 1}: diverged"
                )
        return history


class _Interruptible(keras.callbacks.Callback):
    """Stops training after the batch during which Ctrl-C was pressed."""

    def on_train_batch_end(self, batch, logs=None):
        check_interrupt()

    on_test_batch_end = on_train_batch_end


class Diverged(keras_tuner.errors.FailedTrialError):
    """A trial's loss or metric became NaN or Inf: the only divergence."""
