"""Training quality and state size of AdamPlus's state formats, per backend.

    python benchmarks/low_bit_quality.py                      # all backends
    python benchmarks/low_bit_quality.py --backend jax --model mlp
    python benchmarks/low_bit_quality.py --small              # smoke run

For each model and seed (`--seeds N`: seeds 0 ... N-1), each
`state_format` trains from the same initial weights, on the same batches
with the same dropout masks, and the table prints the final training loss
(the mean over the last epoch; averaged over the seeds), its ratio to
float32 state (`native`) of the same seed measured in the same run (the
mean, and the range over seeds), how many runs diverged, and the
optimizer's bytes of state per trainable parameter. Where a quantized
state's steps differ from float32 state's, the trajectories part, so one
seed's ratio is partly chance: compare the range over seeds.
Issue 22's bar: 8-bit within 1% of float32 state, 4-bit within 3%.
On torch, where installed (neither is a dependency), torchao's and
bitsandbytes' `Adam8bit` train the same models from the same start in the
same `fit` (rows "torchao 8bit", "bitsandbytes 8bit"; `TorchPeer`).

Models: the paper's MLP (784-1000-1000-10, dropout 0.5, Section 6.2) on
MNIST; its VAE (784-500-50, Section 6.4) on MNIST; a c16-c32-64 CNN on
Fashion-MNIST; a small causal Transformer language model (2 blocks, width
64) on generated sequences of a fixed random second-order Markov chain
(learnable structure, no download). MNIST is read from the IDX files in
`--mnist-idx`, $MNIST_IDX_DIR or $KERAS_HOME/datasets/mnist-idx,
Fashion-MNIST through `keras.datasets` (offline from $KERAS_HOME's cache);
a model whose data is missing is reported as not run. Each backend runs
in its own process.
"""

import argparse
import json
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("mlp", "vae", "fashion_cnn", "transformer")
FORMATS = ("native", "8bit", "4bit")
# (epochs, training examples) at full size and with --small.
SIZES = {False: (3, 20000), True: (1, 1000)}


def _transformer(vocab=32, length=32, width=64, heads=4, blocks=2):
    import keras
    from keras import layers

    class Positions(layers.Layer):
        """Adds a learned embedding of each position (inside `call`: a
        tensor made while the graph is built is kept, on torch, with the
        autograd graph of its first use)."""

        def build(self, shape):
            self.table = self.add_weight(shape=tuple(shape[1:]),
                                         initializer="random_normal",
                                         name="positions")

        def call(self, x):
            return x + self.table

    tokens = keras.Input((length,), dtype="int32")
    h = Positions()(layers.Embedding(vocab, width)(tokens))
    for _ in range(blocks):
        a = layers.MultiHeadAttention(heads, width // heads)(
            h, h, use_causal_mask=True)
        h = layers.LayerNormalization()(h + a)
        f = layers.Dense(4 * width, activation="gelu")(h)
        h = layers.LayerNormalization()(h + layers.Dense(width)(f))
    logits = layers.Dense(vocab)(h)
    return keras.Model(tokens, logits, name="transformer_lm")


def _markov_sequences(n, vocab=32, length=32, seed=0):
    """Sequences of a random second-order Markov chain: each next token
    drawn from one of 4 likely successors of the previous two."""
    import numpy as np

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, vocab, 4))
    seq = np.zeros((n, length + 1), "int32")
    seq[:, :2] = rng.integers(0, vocab, size=(n, 2))
    for t in range(2, length + 1):
        pick = rng.integers(0, 4, size=n)
        seq[:, t] = successors[seq[:, t - 2], seq[:, t - 1], pick]
    return seq[:, :-1], seq[:, 1:]


def _data(name, n, mnist_idx):
    """(model builder, loss, x, y) of `name`, or None if its data is
    missing (with the reason printed)."""
    from tuning import datasets, models

    try:
        if name == "mlp":
            data = datasets.mnist_flat(idx_dir=mnist_idx)
            return (lambda: models.mnist_mlp((784,)),
                    "sparse_categorical_crossentropy",
                    data.x_train[:n], data.y_train[:n])
        if name == "vae":
            data = datasets.mnist_autoencode(idx_dir=mnist_idx)
            return (lambda: models.mnist_vae((784,)), models.bernoulli_nll,
                    data.x_train[:n], data.y_train[:n])
        if name == "fashion_cnn":
            (x, y), _ = datasets.load_mnist_arrays("fashion_mnist")
            x = (x[:n].reshape(-1, 28, 28, 1) / 255.0).astype("float32")
            return (lambda: models.finetune_cnn((28, 28, 1)),
                    "sparse_categorical_crossentropy", x,
                    y[:n].astype("int32"))
    except datasets.DatasetUnavailable as err:
        print(f"# {name}: not run ({err})", file=sys.stderr, flush=True)
        return None
    import keras

    x, y = _markov_sequences(n)
    return (_transformer, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), x, y)


# The torch libraries with an 8-bit Adam: row name -> (module, class).
TORCH_PEERS = {"torchao 8bit": ("torchao.optim", "Adam8bit"),
               "bitsandbytes 8bit": ("bitsandbytes.optim", "Adam8bit")}


def torch_peer(name, learning_rate):
    """A Keras optimizer whose step is torch library `name`'s `Adam8bit`
    on the variables' torch parameters (`TORCH_PEERS`), or None where it
    does not import. Keras's torch `fit` has set each parameter's `.grad`
    when it calls `apply`; the library's state is its own (its bytes are
    not counted)."""
    import importlib

    import keras

    module, attribute = TORCH_PEERS[name]
    try:
        make = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, RuntimeError) as err:
        print(f"# {name}: not run ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:120]})", file=sys.stderr,
              flush=True)
        return None

    class TorchPeer(keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(learning_rate=learning_rate, name=name)
            self.peer = None

        def build(self, var_list):
            super().build(var_list)
            self.peer = make([v.value for v in var_list],
                             lr=learning_rate)

        def apply(self, grads, trainable_variables=None):
            self.peer.step()
            self.iterations.assign_add(1)

    return TorchPeer()


def state_bytes_per_parameter(optimizer, model):
    """The optimizer's variables' bytes over the trainable parameters."""
    import numpy as np

    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                for v in optimizer.variables)
    return total / model.count_params()


def worker(models_, formats, small, mnist_idx, seeds=1):
    """Trains every model in every format on this backend: rows."""
    import math

    import keras

    from keras_adam_plus import AdamPlus

    epochs, n = SIZES[small]
    rows = []
    peers = list(TORCH_PEERS) if keras.backend.backend() == "torch" else []
    for name in models_:
        found = _data(name, n, mnist_idx)
        if found is None:
            continue
        build, loss, x, y = found
        for seed, state_format in ((s, f) for s in range(seeds)
                                   for f in formats + peers):
            keras.utils.clear_session()
            keras.utils.set_random_seed(seed)
            model = build()
            if state_format in TORCH_PEERS:
                optimizer = torch_peer(state_format, 1e-3)
                if optimizer is None:
                    continue
            else:
                optimizer = AdamPlus(learning_rate=1e-3,
                                     state_format=state_format)
            model.compile(optimizer=optimizer, loss=loss)
            optimizer.build(model.trainable_variables)
            history = model.fit(x, y, batch_size=128, epochs=epochs,
                                shuffle=False, verbose=0)
            final = float(history.history["loss"][-1])
            rows.append({"model": name, "format": state_format,
                         "seed": seed, "loss": final,
                         "diverged": not math.isfinite(final),
                         "bytes_per_param": None if state_format in
                         TORCH_PEERS else state_bytes_per_parameter(
                             optimizer, model)})
            print(f"# {keras.backend.backend()} {name} {state_format} "
                  f"seed {seed}: {final:.4f}", file=sys.stderr, flush=True)
    return rows


def print_table(backend, rows):
    """One line per model and format: over its seeds, the mean final loss,
    the mean and range of its ratio to float32 state of the same seed,
    the diverged runs."""
    print(f"\n## {backend}\n")
    print("| model | state_format | seeds | final loss | x float32 state "
          "(range) | diverged | bytes/param |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    native = {(r["model"], r.get("seed", 0)): r["loss"] for r in rows
              if r["format"] == "native"}
    lines = {}
    for r in rows:
        lines.setdefault((r["model"], r["format"]), []).append(r)
    for (model, state_format), runs in lines.items():
        finite = [r for r in runs if not r["diverged"]]
        ratios = [r["loss"] / native[model, r.get("seed", 0)]
                  for r in finite if (model, r.get("seed", 0)) in native]
        loss = (f"{sum(r['loss'] for r in finite) / len(finite):.4f}"
                if finite else "diverged")
        ratio = ""
        if ratios:
            ratio = f"{sum(ratios) / len(ratios):.4f}" + (
                f" ({min(ratios):.4f}-{max(ratios):.4f})"
                if len(ratios) > 1 else "")
        size = runs[0]["bytes_per_param"]
        size = "" if size is None else f"{size:.2f}"
        print(f"| {model} | {state_format} | {len(runs)} | {loss} | "
              f"{ratio} | {len(runs) - len(finite)} | {size} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, action="append",
                   help="backend(s) to run (default: all three)")
    p.add_argument("--model", choices=MODELS, action="append",
                   help="model(s) to train (default: all)")
    p.add_argument("--format", choices=FORMATS, action="append",
                   help="state formats (default: those this version has)")
    p.add_argument("--small", action="store_true",
                   help="1 epoch on 1000 examples: a smoke run")
    p.add_argument("--mnist-idx", default=None,
                   help="folder of MNIST's IDX files (default: "
                        "$MNIST_IDX_DIR or $KERAS_HOME/datasets/mnist-idx)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train each with seeds 0 ... N-1 (default: 1)")
    p.add_argument("--json", metavar="FILE", help="also write the rows")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"argument --seeds: must be at least 1, got {args.seeds}")
    if args.worker:
        rows = worker(args.model or MODELS, args.format, args.small,
                      args.mnist_idx, args.seeds)
        print("@@" + json.dumps(rows), flush=True)
        return 0
    formats = args.format or _available_formats()
    tables = {}
    for backend in args.backend or BACKENDS:
        cmd = [sys.executable, __file__, "--worker"] + [
            f"--model={m}" for m in args.model or MODELS] + [
            f"--format={f}" for f in formats] + [f"--seeds={args.seeds}"] + (
            ["--small"] if args.small else []) + (
            [f"--mnist-idx={args.mnist_idx}"] if args.mnist_idx else [])
        env = dict(os.environ, KERAS_BACKEND=backend,
                   TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE,
                              text=True)
        if proc.returncode:
            return proc.returncode
        rows = json.loads(proc.stdout.rpartition("@@")[2])
        print_table(backend, rows)
        tables[backend] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=1)
    return 0


def _available_formats():
    """The formats of `FORMATS` that this version's AdamPlus accepts."""
    from keras_adam_plus import validation

    return [f for f in FORMATS if f in validation.STATE_FORMATS]


if __name__ == "__main__":
    sys.exit(main())
