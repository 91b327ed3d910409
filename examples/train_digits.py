"""Train a small MLP on scikit-learn's digits with AdamPlus; save and reload.

Run: python examples/train_digits.py   (any KERAS_BACKEND; no download)
"""

import os
import tempfile

import keras

import keras_adam_plus  # noqa: F401  (registers AdamPlus for load_model)
from keras_adam_plus import AdamPlus
from tuning.benchmarks import digits_mlp
from tuning.datasets import digits


def main():
    data = digits()
    model = digits_mlp((64,))
    model.compile(optimizer=AdamPlus(learning_rate=3e-3),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    print(f"backend: {keras.backend.backend()}")
    history = model.fit(data.x_train, data.y_train, batch_size=32,
                        epochs=10, verbose=0,
                        validation_data=(data.x_val, data.y_val))
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
