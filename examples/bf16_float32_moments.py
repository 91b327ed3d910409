"""bfloat16 weights with float32 moments: AdamPlus(moment_dtype="float32").

    python examples/bf16_float32_moments.py           # any KERAS_BACKEND
    python examples/bf16_float32_moments.py --small   # 2 epochs (CI)

The same model is trained with bfloat16 weights by keras.optimizers.Adam,
AdamPlus with bfloat16 moments (the default: moments in the weights'
dtype), and AdamPlus with float32 moments, beside a float32 run. AdamPlus
computes each step in float32 and rounds what it stores once; Keras's Adam
computes in bfloat16, where `beta_2 = 0.999` is `1.0`, so its step size
`lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)` is 0 and its weights never
change (checked on all three backends). float32 moments cost 4 bytes per
parameter each instead of 2, and keep the small updates `(1 - beta_2) *
g**2` that a bfloat16 `v` loses (bfloat16 holds 8 significant bits);
with float16 weights, whose `g**2` underflows below |g| ~ 1e-2, use them
always.
"""

import argparse
import os

# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402


def train(optimizer, dtype, x, y, epochs):
    """Final training loss of a small MLP whose layers hold `dtype`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu", dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    moments = [v for v in optimizer.variables
               if v.name.endswith(("momentum", "velocity"))]
    return history.history["loss"][-1], moments[0].dtype


def main(small=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 32)).astype("float32")
    y = (x @ rng.normal(size=(32, 1)) * 0.1).astype("float32")
    epochs = 2 if small else 10
    runs = {
        "float32 weights, AdamPlus": (AdamPlus(), "float32"),
        "bfloat16, keras Adam": (keras.optimizers.Adam(), "bfloat16"),
        "bfloat16, AdamPlus": (AdamPlus(), "bfloat16"),
        "bfloat16, AdamPlus(moment_dtype='float32')": (
            AdamPlus(moment_dtype="float32"), "bfloat16"),
    }
    print(f"backend {keras.backend.backend()}, {epochs} epochs")
    for label, (optimizer, dtype) in runs.items():
        loss, moment_dtype = train(optimizer, dtype, x, y, epochs)
        print(f"{label:44s} loss {loss:.4f}  (moments in {moment_dtype})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="two epochs, for a quick check")
    main(parser.parse_args().small)
