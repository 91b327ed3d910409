"""Training within a memory budget for optimizer state: 8- or 4-bit state.

    python examples/low_bit_state.py           # any KERAS_BACKEND
    python examples/low_bit_state.py --small   # a smaller model (CI)

Adam keeps two float32 moments per weight: 8 bytes per parameter, twice
the float32 weights. Here the optimizer's state may take at most a set
budget (`--budget-mb`): a wide MLP on scikit-learn's digits whose float32
state is over it. The script builds the optimizer in each format, measures
the bytes its variables take, trains with the most precise format that
fits, and, for comparison, also trains the float32 state that did not fit
(same seed, same batches): the two final losses are printed side by side.
"""

import argparse
import os

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402

# From the most precise to the smallest: the first that fits is used.
FORMATS = ("native", "8bit", "4bit")


def model_and_optimizer(width, state_format):
    """A 64-width-width-10 MLP, compiled with AdamPlus in `state_format`."""
    keras.utils.set_random_seed(0)  # the same weights for every format
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10),
    ])
    # Tensors under 4096 elements (biases) keep float32 state in any
    # format: quantizing them saves little and costs accuracy.
    optimizer = AdamPlus(learning_rate=1e-3, state_format=state_format)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    optimizer.build(model.trainable_variables)  # its state exists now
    return model, optimizer


def state_bytes(optimizer):
    """Bytes taken by the optimizer's variables (moments, codes, scales,
    step count)."""
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for v in optimizer.variables)


def main(small=False, budget_mb=None):
    width, epochs = (1024, 2) if small else (2048, 10)
    budget_mb = budget_mb or (4.0 if small else 16.0)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")

    sizes = {}
    for state_format in FORMATS:
        model, optimizer = model_and_optimizer(width, state_format)
        sizes[state_format] = state_bytes(optimizer) / 2**20
    params = model.count_params()
    print(f"{params:,} parameters; optimizer state budget {budget_mb:g} MB")
    for state_format, mb in sizes.items():
        print(f"  state_format={state_format!r}: {mb:.1f} MB "
              f"({mb * 2**20 / params:.2f} bytes/parameter)"
              + ("" if mb <= budget_mb else "  over the budget"))
    fitting = [f for f in FORMATS if sizes[f] <= budget_mb]
    if not fitting:
        raise SystemExit(f"no state format fits in {budget_mb:g} MB; "
                         "raise --budget-mb or make the model smaller")

    losses, described = {}, {}
    for state_format in dict.fromkeys([fitting[0], "native"]):
        model, optimizer = model_and_optimizer(width, state_format)
        history = model.fit(x, y, batch_size=64, epochs=epochs,
                            shuffle=False, verbose=0)
        losses[state_format] = history.history["loss"][-1]
        described[state_format] = optimizer.describe().splitlines()[-1]
    print(f"trained with state_format={fitting[0]!r}: final training loss "
          f"{losses[fitting[0]]:.4f}; float32 state (for comparison, over "
          f"the budget): {losses['native']:.4f} "
          f"(backend {keras.backend.backend()}, {epochs} epochs)")
    print(described[fitting[0]])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="a 2x1024 model, two epochs: a quick check")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="the optimizer state's budget in MiB "
                             "(default: 16, or 4 with --small)")
    args = parser.parse_args()
    main(args.small, args.budget_mb)
