"""A small model trained with model.fit on scikit-learn's digits set."""

import pytest

from keras_adam_plus import AdamPlus
from tuning.benchmarks import digits_mlp
from tuning.datasets import digits

pytestmark = pytest.mark.quick


def test_mlp_on_digits_reaches_95_percent():
    data = digits()
    model = digits_mlp((64,))
    model.compile(optimizer=AdamPlus(learning_rate=3e-3),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(data.x_train, data.y_train, batch_size=32,
                        epochs=15, verbose=0,
                        validation_data=(data.x_val, data.y_val))
    losses = history.history["loss"]
    assert losses[-1] < 0.25 * losses[0]
    # 400 held-out digits: 95% leaves room for seed-to-seed noise only.
    assert history.history["val_accuracy"][-1] >= 0.95
