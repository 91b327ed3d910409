"""A custom JAX training loop: AdamPlus.stateless_apply under jax.jit.

    KERAS_BACKEND=jax python examples/jax_custom_loop.py
    KERAS_BACKEND=jax python examples/jax_custom_loop.py --small   # CI

The model and the optimizer are used statelessly: their values are JAX
arrays passed into and returned from one jitted step, then written back to
the Keras variables once at the end.
"""

import argparse
import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
if importlib.util.find_spec("jax") is None:  # one line, not a traceback
    raise SystemExit("this example needs JAX: "
                     'pip install -c .ci/constraints.txt -e ".[jax]"')
# Silence TensorFlow's start-up lines; must come before Keras is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_adam_plus import AdamPlus  # noqa: E402


def main(small=False):
    if keras.backend.backend() != "jax":
        raise SystemExit("this example needs KERAS_BACKEND=jax")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype("float32")
    y = (x @ rng.normal(size=(16, 1))).astype("float32")

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    optimizer = AdamPlus(learning_rate=1e-2)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError()

    def loss_and_state(trainable, non_trainable, xb, yb):
        pred, non_trainable = model.stateless_call(trainable, non_trainable,
                                                   xb, training=True)
        return loss_fn(yb, pred), non_trainable

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    # Donate the trainable and the optimizer values, in the order
    # stateless_apply returns them (trainable first): XLA then updates the
    # buffers in place instead of copying them.
    def train_step(trainable, opt_values, non_trainable, xb, yb):
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable,
                                               xb, yb)
        trainable, opt_values = optimizer.stateless_apply(opt_values, grads,
                                                          trainable)
        return trainable, opt_values, non_trainable, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    opt_values = [v.value for v in optimizer.variables]

    epochs, batch = (2 if small else 20), 64
    for epoch in range(1, epochs + 1):
        for start in range(0, len(x), batch):
            trainable, opt_values, non_trainable, loss = train_step(
                trainable, opt_values, non_trainable,
                x[start:start + batch], y[start:start + batch])
        print(f"epoch {epoch:2d}  loss {float(loss):.4f}")

    # Write the values back into the Keras objects (for saving, evaluate).
    for variable, value in zip(model.trainable_variables, trainable):
        variable.assign(value)
    for variable, value in zip(model.non_trainable_variables, non_trainable):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, opt_values):
        variable.assign(value)
    print(f"optimizer step {int(optimizer.iterations.numpy())}, "
          f"path: {optimizer.fast_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="two epochs, for a quick check")
    main(parser.parse_args().small)
