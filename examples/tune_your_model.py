"""Tune AdamPlus on your own model with your own keras-tuner tuner.

    python examples/tune_your_model.py           # any KERAS_BACKEND
    python examples/tune_your_model.py --small   # 3 trials of 1 epoch (CI)

`tuning.SearchSpace` is the package's one declaration of AdamPlus's
hyperparameters and their priors (the same the CLI searches):
`space.declare(hp)` declares them inside your `build(hp)`, beside your own
hyperparameters, and `space.optimizer_kwargs(...)` turns keras-tuner's
values into AdamPlus keyword arguments. keras-tuner's files go to a
temporary folder, removed at the end.
"""

import argparse
import os
import tempfile

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import keras_tuner  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402
from tuning import SearchSpace  # noqa: E402

# Search the learning rate and beta_2 (log-uniform in 1 - beta_2); beta_1
# and epsilon stay at the paper's values.
SPACE = SearchSpace(tune=("learning_rate", "beta_2"))


def build(hp):
    """Your model: its own hyperparameter (units) and AdamPlus's."""
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(hp.Int("units", 32, 128, step=32),
                           activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    optimizer = AdamPlus(**SPACE.optimizer_kwargs(SPACE.declare(hp)))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main(small=False):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    trials, epochs = (3, 1) if small else (12, 8)
    with tempfile.TemporaryDirectory() as folder:
        tuner = keras_tuner.BayesianOptimization(
            build, objective="val_loss", max_trials=trials, seed=0,
            directory=folder, project_name="my_model")
        tuner.search(x, y, validation_split=0.2, epochs=epochs, verbose=0)
        best = tuner.get_best_hyperparameters()[0]
    kwargs = SPACE.optimizer_kwargs(best.values)
    print(f"best units: {best.values['units']}")
    print("best AdamPlus arguments:", {k: float(f"{v:.3g}")
                                      for k, v in kwargs.items()})

    # Train the best configuration from scratch.
    model = build(best)
    history = model.fit(x, y, validation_split=0.2, epochs=epochs, verbose=0)
    print(f"retrained: val_accuracy {history.history['val_accuracy'][-1]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="three trials of one epoch, for a quick check")
    main(parser.parse_args().small)
