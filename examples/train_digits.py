"""Train a small MLP on scikit-learn's digits with AdamPlus; save and reload.

Run: python examples/train_digits.py   (any KERAS_BACKEND; no download)
"""

import os
import tempfile

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_adam_plus  # noqa: F401  (registers AdamPlus for load_model)
from keras_adam_plus import AdamPlus


def main():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=AdamPlus(learning_rate=3e-3),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    print(f"backend: {keras.backend.backend()}")
    history = model.fit(x[:1400], y[:1400], batch_size=32, epochs=10,
                        validation_data=(x[1400:], y[1400:]), verbose=0)
    for epoch, (loss, acc) in enumerate(
        zip(history.history["loss"], history.history["val_accuracy"]), 1
    ):
        print(f"epoch {epoch:2d}  loss {loss:.4f}  val_accuracy {acc:.3f}")

    path = os.path.join(tempfile.mkdtemp(), "digits.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    print(f"saved and reloaded: {type(restored.optimizer).__name__} at "
          f"step {int(restored.optimizer.iterations.numpy())}")


if __name__ == "__main__":
    main()
