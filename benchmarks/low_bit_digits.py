"""Final training loss with float32, 8-bit and 4-bit optimizer state.

    KERAS_BACKEND=jax python benchmarks/low_bit_digits.py
    KERAS_BACKEND=jax python benchmarks/low_bit_digits.py --depth 2 \
        --learning-rate 1e-3 --epochs 20 --seeds 0,1,2

An MLP (64 - width x depth, ReLU - 10) on scikit-learn's digits (1797
images of 8 x 8, kept in memory), batch 128, no shuffling, the same seed
for every format. Prints one row per seed and format: the last epoch's
training loss and accuracy, the loss relative to float32 state, and the
optimizer's bytes of state per parameter. Not a test: the numbers are
reported in docs/guide/low-bit.md.
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

from keras_adam_plus import AdamPlus

FORMATS = ("native", "8bit", "4bit")


def run(state_format, seed, args, x, y):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(args.width, activation="relu")
           for _ in range(args.depth)]
        + [keras.layers.Dense(10)])
    optimizer = AdamPlus(learning_rate=args.learning_rate,
                         state_format=state_format,
                         state_format_min_size=args.min_size)
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    history = model.fit(x, y, batch_size=128, epochs=args.epochs,
                        shuffle=False, verbose=0).history
    state = sum(np.asarray(keras.ops.convert_to_numpy(v)).nbytes
                for v in optimizer.variables)
    return (history["loss"][-1], history["accuracy"][-1],
            state / model.count_params())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=4096)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    print(f"{keras.backend.backend()}: 64-{args.width}x{args.depth}-10, "
          f"lr {args.learning_rate}, {args.epochs} epochs, min size "
          f"{args.min_size}")
    for seed in (int(s) for s in args.seeds.split(",")):
        base = None
        for state_format in FORMATS:
            loss, accuracy, per_param = run(state_format, seed, args, x, y)
            base = loss if base is None else base
            print(f"  seed {seed} {state_format:>6}: loss {loss:.4f} "
                  f"({(loss - base) / base:+.1%}) accuracy {accuracy:.4f} "
                  f"bytes/param {per_param:.3f}", flush=True)


if __name__ == "__main__":
    main()
