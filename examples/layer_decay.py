"""Fine-tuning with layer-wise learning-rate decay: layer_decay_groups.

    python examples/layer_decay.py           # any KERAS_BACKEND
    python examples/layer_decay.py --small   # fewer epochs (CI)

A small network is pretrained on scikit-learn's digits 0-4 and saved; it is
loaded back, its head replaced by a new one for digits 5-9, and fine-tuned
with `layer_decay_groups(model, decay=0.75)`: the new head learns at the
full rate, the layer below it at 0.75 of it, the first at 0.75**2, so the
pretrained features move least where they are most general (BEiT, ELECTRA).
`optimizer.describe()` prints each group's multiplier and its variables.
"""

import argparse
import os
import tempfile

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_adam_plus import AdamPlus, layer_decay_groups  # noqa: E402


def digits(labels):
    """The 8x8 digits whose label is in `labels`, as (x, y), y from 0."""
    x, y = load_digits(return_X_y=True)
    keep = np.isin(y, labels)
    return (x[keep] / 16.0).astype("float32"), y[keep] - min(labels)


def main(small=False):
    keras.utils.set_random_seed(0)
    epochs = 3 if small else 20
    with tempfile.TemporaryDirectory() as folder:  # removed at the end
        # 1. Pretrain on digits 0-4 and save, as a pretrained model comes.
        x, y = digits([0, 1, 2, 3, 4])
        model = keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="features_1"),
            keras.layers.Dense(32, activation="relu", name="features_2"),
            keras.layers.Dense(5, name="head_0_to_4"),
        ])
        model.compile(optimizer=AdamPlus(learning_rate=1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), metrics=["accuracy"])
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
        path = os.path.join(folder, "pretrained.keras")
        model.save(path)

        # 2. Load it, keep its features, put a new head for digits 5-9.
        pretrained = keras.saving.load_model(path)
        model = keras.Sequential([
            keras.Input((64,)),
            *pretrained.layers[:-1],
            keras.layers.Dense(5, name="head_5_to_9"),
        ])

    # 3. Fine-tune: the head at the full rate, each layer below at 0.75x.
    optimizer = AdamPlus(learning_rate=3e-3,
                         variable_groups=layer_decay_groups(model,
                                                            decay=0.75))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=["accuracy"])
    x, y = digits([5, 6, 7, 8, 9])
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                        validation_split=0.2)
    print(optimizer.describe())
    print(f"backend {keras.backend.backend()}, {epochs} epochs: digits 5-9 "
          f"val_accuracy {history.history['val_accuracy'][-1]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="three epochs, for a quick check")
    main(parser.parse_args().small)
