"""A custom PyTorch training loop with AdamPlus.

    KERAS_BACKEND=torch python examples/torch_custom_loop.py
    KERAS_BACKEND=torch python examples/torch_custom_loop.py --small   # CI

Keras layers are torch modules on this backend: autograd gives the
gradients (`loss.backward()`), and `optimizer.apply` takes the step, here
with torch's fused multi-tensor kernel (`optimizer.fast_path`).
"""

import argparse
import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
if importlib.util.find_spec("torch") is None:  # one line, not a traceback
    raise SystemExit("this example needs PyTorch: "
                     'pip install -c .ci/constraints.txt -e ".[torch]"')
# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402


def main(small=False):
    if keras.backend.backend() != "torch":
        raise SystemExit("this example needs KERAS_BACKEND=torch")
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(1024, 16)), dtype=torch.float32)
    y = x @ torch.tensor(rng.normal(size=(16, 1)), dtype=torch.float32)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    optimizer = AdamPlus(learning_rate=1e-2, weight_decay=1e-4)
    loss_fn = keras.losses.MeanSquaredError()

    epochs, batch = (2 if small else 20), 64
    for epoch in range(1, epochs + 1):
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            model.zero_grad()
            loss = loss_fn(yb, model(xb, training=True))
            loss.backward()
            variables = model.trainable_weights
            grads = [v.value.grad for v in variables]
            with torch.no_grad():  # the step itself is not differentiated
                optimizer.apply(grads, variables)
        print(f"epoch {epoch:2d}  loss {loss.item():.4f}")
    print(f"optimizer step {int(optimizer.iterations.numpy())}, "
          f"path: {optimizer.fast_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="two epochs, for a quick check")
    main(parser.parse_args().small)
