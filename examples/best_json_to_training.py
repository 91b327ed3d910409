"""A search's best.json into a training run.

    python examples/best_json_to_training.py --best tuning_runs/digits/best.json
    python examples/best_json_to_training.py           # searches first (~1 min)
    python examples/best_json_to_training.py --small   # a 2-trial search (CI)

`python -m tuning` writes the best configuration it found to best.json in
its folder: every AdamPlus argument the best trial used, its learning-rate
schedule (if any) in Keras's serialized form, so
`AdamPlus.from_config(json.load(f))` rebuilds it on every benchmark.
Without `--best`, this runs a small search into a temporary folder first
(removed at the end), then trains with its result and with the paper's
defaults. One seed's best is partly luck: `python -m tuning --confirm`
retrains it on new seeds before you rely on it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402


def search(folder, small):
    """Runs `python -m tuning` into `folder`; returns its best.json path."""
    budget = ["--max-trials", "2", "--epochs", "1"] if small else []
    subprocess.run([sys.executable, "-m", "tuning", "--directory",
                    str(folder), "--no-plots", *budget], check=True,
                   stdout=subprocess.DEVNULL)  # its summary is in summary.txt
    print((Path(folder) / "summary.txt").read_text())
    return Path(folder) / "best.json"


def train(config, x, y, epochs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=AdamPlus.from_config(config),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(x, y, validation_split=0.2, epochs=epochs,
                        batch_size=32, verbose=0)
    return history.history["val_loss"][-1]


def main(best=None, small=False):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(best) if best else search(folder, small)
        with open(path) as f:
            config = json.load(f)
    print("best.json:", config)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    epochs = 2 if small else 8
    print(f"val_loss after {epochs} epochs: tuned "
          f"{train(config, x, y, epochs):.4f}, paper defaults "
          f"{train({}, x, y, epochs):.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best", metavar="FILE",
                        help="a best.json to use (default: search first)")
    parser.add_argument("--small", action="store_true",
                        help="a 2-trial search and 2 epochs, for CI")
    args = parser.parse_args()
    main(args.best, args.small)
