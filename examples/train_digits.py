"""Train an MLP on scikit-learn's digits with AdamPlus; save, load, continue.

    python examples/train_digits.py            # any KERAS_BACKEND; no download
    python examples/train_digits.py --small    # 2 + 2 epochs (CI)

Needs scikit-learn (the `tune` or `test` extra) for the digits.
"""

import argparse
import os
import tempfile

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402  (registers AdamPlus)


def main(small=False):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    epochs = 2 if small else 10

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=AdamPlus(learning_rate=3e-3),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    print(f"backend: {keras.backend.backend()}")
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                        validation_split=0.2)
    for epoch, (loss, acc) in enumerate(
        zip(history.history["loss"], history.history["val_accuracy"]), 1
    ):
        print(f"epoch {epoch:2d}  loss {loss:.4f}  val_accuracy {acc:.3f}")

    # Save and load: the optimizer comes back with its config and its state
    # (m, v, the step), so training continues where it stopped. The folder
    # is removed when the `with` block ends.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "digits.keras")
        model.save(path)
        restored = keras.models.load_model(path)  # no custom_objects needed
    step = int(restored.optimizer.iterations.numpy())
    print(f"reloaded: {type(restored.optimizer).__name__} at step {step}")
    history = restored.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                           validation_split=0.2)
    print(f"continued {epochs} epochs: loss "
          f"{history.history['loss'][-1]:.4f}, step "
          f"{int(restored.optimizer.iterations.numpy())}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="a few epochs, for a quick check")
    main(parser.parse_args().small)
