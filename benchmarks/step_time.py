"""Time one optimizer step of AdamPlus against its peers, per backend.

    python benchmarks/step_time.py                    # all three backends
    python benchmarks/step_time.py --backend torch    # one backend
    python benchmarks/step_time.py --quick            # small sizes, smoke run

Each backend runs in its own process (KERAS_BACKEND is fixed at import).
For every case (10M parameters in 1 variable, 10M in 200, 1M in 1000) it
prints the median time of one step of AdamPlus (default, amsgrad, weight
decay), its keras.optimizers peers, and the framework's own Adam
(torch.optim.Adam foreach and fused; optax.adam under jit; on JAX also a
bare jitted per-variable Adam loop, the room XLA leaves, the same loop with
every variable's m and v in one flat buffer, what grouping all variables
would give, and AdamPlus without its groups of small variables), each as a
ratio
to the memory bandwidth floor and to its keras.optimizers peer (Adam,
Adam(amsgrad=True), AdamW; torch and optax rows against Adam) measured in
the same run.

The floor is 28 bytes per float32 parameter (read theta, g, m, v; write
theta, m, v) over the streaming bandwidth measured here at each case's
size, the best of a few in-place probes (see `bandwidth`).
On TensorFlow, a 1M x 64 embedding table with a sparse gradient of 4096
rows compares dense steps with `AdamPlus(lazy_sparse=True)` (its floor row
is the dense one). Finally, `model.fit` step time with AdamPlus and
keras.optimizers.Adam of the paper's MLP (784-1000-1000-10, batch 128,
random MNIST-shaped data) and of a many-variable model (ResNet50 from
keras.applications, weights=None, 32x32 inputs, 214 variables, batch 16).

Where the backend computes on a GPU (torch on CUDA, JAX on a GPU), the
cases are `GPU_CASES` (100M parameters in 1, 200 and 1000 variables, 10M in
1000), the rows `GPU_VARIANTS` plus the frameworks' own Adam, the floor is
probed on the GPU, and each timed sample is `GPU_BATCH` steps between two
synchronisations. `--no-steps` times only `model.fit`.
benchmarks/gpu_check.sh runs this and the device tests on a GPU machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
CASES = {
    "10M x 1": [10_000_000],
    "10M x 200": [50_000] * 200,
    "1M x 1000": [1_000] * 1000,
}
QUICK_CASES = {"1M x 1": [1_000_000], "1M x 100": [10_000] * 100}
# On a GPU (found by the backend itself): 100M parameters, where one
# variable sits at the bandwidth floor and many pay per-variable launches.
GPU_CASES = {
    "100M x 1": [100_000_000],
    "100M x 200": [500_000] * 200,
    "100M x 1000": [100_000] * 1000,
    "10M x 1000": [10_000] * 1000,
}
# On a GPU the rows that the issues' GPU tables ask for (the others are
# CPU-only to keep the run inside a short lease).
GPU_VARIANTS = ("keras Adam", "AdamPlus", "AdamPlus skip_nonfinite",
                "AdamPlus grouped", "AdamPlus 4 groups", "AdamPlus 8bit")
# `--variant`: the keras variants to time (None: all); the frameworks' own
# Adam rows are timed only when no variant is chosen.
SELECTED = None
# Steps per timed sample on a GPU: one synchronisation per sample, so
# that the host's wait is not counted in every step.
GPU_BATCH = 10
BYTES_PER_PARAM = 28


def median_time(step, repeats, warmup=3, sync=lambda: None, batch=1):
    """Median wall time of one `step()` in seconds, per call.

    Over `repeats` samples of `batch` calls each (see `measure`).
    """
    return measure({"": (step, sync)}, repeats, warmup, rounds=1,
                   batch=batch)[""]


def measure(steps, repeats, warmup=3, rounds=3, batch=1):
    """Median step time of each `{label: (step, sync)}`, interleaved.

    Every step is warmed up (traced, compiled), then the labels take turns:
    `rounds` rounds of `repeats // rounds` timed samples each, so that
    drift in the machine's speed during the run hits every label alike. A
    sample is `batch` calls and one `sync()` (on a GPU, so that the
    device's queue stays full as in training), divided by `batch`.
    """
    times = {label: [] for label in steps}
    for step, sync in steps.values():
        for _ in range(warmup):
            step()
        sync()
    for _ in range(rounds):
        for label, (step, sync) in steps.items():
            for _ in range(max(1, repeats // rounds)):
                start = time.perf_counter()
                for _ in range(batch):
                    step()
                sync()
                times[label].append((time.perf_counter() - start) / batch)
    return {label: statistics.median(t) for label, t in times.items()}


def accelerator():
    """`"gpu"` where the Keras backend computes on a GPU, else None.

    torch: where Keras puts a new tensor (it honours KERAS_TORCH_DEVICE);
    only CUDA counts (the GPU mode's sync and floor probe are CUDA's).
    """
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        return "gpu" if keras.ops.zeros(()).device.type == "cuda" else None
    if backend == "jax":
        import jax

        return "gpu" if jax.default_backend() == "gpu" else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else None
    return None


def _cuda_sync():
    import torch

    torch.cuda.synchronize()


def bandwidth(repeats, n=40_000_000):
    """Streaming bandwidth in bytes/s: the best of a few in-place probes.

    `n` is the case's parameter count, so that the probes touch as much
    memory as the step does. In place, as the optimizers update theta, m
    and v (no write-allocate traffic): NumPy and torch `a += b` (read 2,
    write 1: 12 bytes per element), torch `a += b * c` (16 bytes) and
    torch's fused Adam kernel itself (read 4, write 3: 28 bytes, the step's
    own footprint). The best rate wins, so that the floor (28 bytes per
    parameter at that rate) stays below every step measured.
    """
    import numpy as np

    n = max(n, 1_000_000)
    if accelerator():
        return _gpu_bandwidth(repeats, n)
    a, b = (np.full(n, 1.0, np.float32) for _ in range(2))
    rates = [12 * n / median_time(lambda: np.add(a, b, out=a), repeats)]
    del a, b
    try:
        import torch
    except ImportError:
        return max(rates)
    a, b, c, d = (torch.ones(n) for _ in range(4))
    rates.append(12 * n / median_time(lambda: a.add_(b), repeats))
    rates.append(16 * n / median_time(lambda: a.addcmul_(b, c), repeats))
    if hasattr(torch, "_fused_adam_"):
        step = [torch.ones(())]
        rates.append(28 * n / median_time(
            lambda: torch._fused_adam_(
                [a], [b], [c], [d], [], step, lr=1e-3, beta1=0.9,
                beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                maximize=False), repeats))
    return max(rates)


def _gpu_bandwidth(repeats, n):
    """The GPU's rate at the case's footprint: the best of torch probes.

    `a += b`, `a += b * c`, a device-to-device copy (read 1, write 1) and
    torch's fused Adam kernel itself (28 bytes), on the GPU, each timed in
    batches of `GPU_BATCH` between synchronisations (the JAX backend's
    floor is probed through torch on the same GPU). Without torch on CUDA,
    JAX's jitted `a + b` (buffers donated).
    """
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        return _jax_gpu_bandwidth(repeats, n)

    t = [torch.rand(n, device="cuda") for _ in range(4)]
    probes = [(12, lambda: t[0].add_(t[1])),
              (16, lambda: t[0].addcmul_(t[1], t[2])),
              (8, lambda: t[0].copy_(t[1]))]
    if hasattr(torch, "_fused_adam_"):
        step = [torch.ones((), device="cuda")]
        probes.append((28, lambda: torch._fused_adam_(
            [t[0]], [t[1]], [t[2]], [t[3]], [], step, lr=1e-3, beta1=0.9,
            beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
            maximize=False)))
    rates = [size * n / median_time(probe, repeats, sync=_cuda_sync,
                                    batch=GPU_BATCH)
             for size, probe in probes]
    t.clear()
    torch.cuda.empty_cache()
    return max(rates)


def _jax_gpu_bandwidth(repeats, n):
    import jax

    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    state = [jax.random.normal(jax.random.PRNGKey(i), (n,)) for i in (0, 1)]

    def probe():
        state[0] = add(state[0], state[1])

    seconds = median_time(probe, repeats, batch=GPU_BATCH,
                          sync=lambda: jax.block_until_ready(state[0]))
    return 12 * n / seconds


# label -> (constructor, the keras.optimizers peer it is compared with).
def keras_variants():
    import keras

    from keras_adam_plus import AdamPlus

    return {
        "keras Adam": (keras.optimizers.Adam, None),
        "AdamPlus": (AdamPlus, "keras Adam"),
        "keras Adam amsgrad": (
            lambda: keras.optimizers.Adam(amsgrad=True), None),
        "AdamPlus amsgrad": (
            lambda: AdamPlus(amsgrad=True), "keras Adam amsgrad"),
        "keras AdamW": (
            lambda: keras.optimizers.AdamW(weight_decay=0.01), None),
        "AdamPlus wd": (
            lambda: AdamPlus(weight_decay=0.01), "keras AdamW"),
        # The cost of the NaN/Inf guard: its ratio is to plain AdamPlus.
        "AdamPlus skip_nonfinite": (
            lambda: AdamPlus(skip_nonfinite=True), "AdamPlus"),
        # JAX: flat slots for small variables (jax_grouped, opt-in); its
        # ratio is to AdamPlus (one slot per variable).
        "AdamPlus grouped": (
            lambda: AdamPlus(group_small_variables=True), "AdamPlus"),
        # variable_groups: the variables in 4 groups of other settings
        # (a quarter each); its ratio is to AdamPlus (one group).
        "AdamPlus 4 groups": (_four_groups, "AdamPlus"),
        # 8-bit block-wise state (keras_adam_plus.lowbit); its ratio is to
        # AdamPlus with float32 state.
        "AdamPlus 8bit": (lambda: AdamPlus(state_format="8bit"), "AdamPlus"),
    }


def _four_groups():
    """AdamPlus whose variables (by position) form 4 `variable_groups`."""
    import re

    from keras_adam_plus import AdamPlus, groups

    class FourGroups(AdamPlus):
        def build(self, var_list):
            quarters = [var_list[i::4] for i in range(1, 4)]
            # Settings that change the numbers, not the work: a group
            # with a weight decay would add a pass over its variables
            # that one group without decay does not make.
            settings = ({"learning_rate_multiplier": 0.5},
                        {"learning_rate_multiplier": 2.0, "beta_1": 0.8},
                        {"beta_2": 0.99, "epsilon": 1e-6})
            self.variable_groups = groups.check([
                {"match": "^(" + "|".join(re.escape(v.path)
                                          for v in quarter) + ")$", **extra}
                for quarter, extra in zip(quarters, settings) if quarter],
                False)
            super().build(var_list)

    return FourGroups()


def keras_variants_labels():
    """The labels of `keras_variants`, without importing Keras."""
    return ("keras Adam", "AdamPlus", "keras Adam amsgrad",
            "AdamPlus amsgrad", "keras AdamW", "AdamPlus wd",
            "AdamPlus skip_nonfinite", "AdamPlus grouped",
            "AdamPlus 4 groups", "AdamPlus 8bit")


def peer_of(label, labels):
    """The keras peer a row's ratio is taken against, if it was measured.

    AdamPlus variants against their keras counterpart, the frameworks' own
    Adam (torch, optax) against keras.optimizers.Adam, each with the same
    compilation suffix ("(XLA)") where there is one.
    """
    base, suffix = label, ""
    if " (" in label:
        base, suffix = label[:label.find(" (")], label[label.find(" ("):]
    variants = keras_variants()
    peer = variants[base][1] or base if base in variants else "keras Adam"
    for candidate in (peer + suffix, peer):
        if candidate in labels:
            return candidate
    return None


def _release():
    """Frees the last variant's variables before the next is built."""
    import gc

    import keras

    keras.utils.clear_session()
    gc.collect()


def _variants():
    """The keras variants this run times: all, or `GPU_VARIANTS` on a GPU.

    "AdamPlus grouped" only on JAX, the backend that groups.
    """
    import keras

    variants = keras_variants()
    if keras.backend.backend() != "jax":
        del variants["AdamPlus grouped"]
    if accelerator():
        variants = {k: v for k, v in variants.items() if k in GPU_VARIANTS}
    if SELECTED:
        variants = {k: v for k, v in variants.items() if k in SELECTED}
    return variants


def _measure(steps, repeats):
    """`measure` with this device's batching (one sync per GPU_BATCH)."""
    return measure(steps, repeats, batch=GPU_BATCH if accelerator() else 1)


# --- one runner per backend: {label: seconds} for one case --------------

def run_torch(sizes, repeats):
    import keras
    import torch

    steps = {}
    device = keras.ops.zeros(()).device  # where Keras computes
    sync = _cuda_sync if accelerator() else _no_sync
    grads = [torch.randn(n, device=device) for n in sizes]
    for label, (make, _) in _variants().items():
        variables = [keras.Variable(torch.zeros(n, device=device))
                     for n in sizes]
        optimizer = make()
        optimizer.build(variables)
        steps[label] = (
            lambda o=optimizer, v=variables: o.apply(grads, v), sync
        )
    for label, kwargs in () if SELECTED else (
            ("torch Adam foreach", {"foreach": True}),
            ("torch Adam fused", {"fused": True})):
        params = [torch.zeros(n, device=device, requires_grad=True)
                  for n in sizes]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = torch.optim.Adam(params, lr=1e-3, **kwargs)
        steps[label] = (optimizer.step, sync)
    return _measure(steps, repeats)


def _no_sync():
    return None


def _applier(optimizer, grads, variables):
    # A closure, not default arguments: tf.function would trace those.
    def apply():
        optimizer.apply(grads, variables)

    return apply


def _tf_sync(optimizer):
    # The step count is written last; reading it (a scalar) waits for the
    # step without copying a whole table to NumPy.
    return lambda: optimizer.iterations.numpy()


def run_tensorflow(sizes, repeats):
    import keras
    import tensorflow as tf

    results = {}
    grads = [tf.random.normal((n,)) for n in sizes]
    for jit in (False, True):
        suffix = " (XLA)" if jit else " (tf.function)"
        steps = {}
        for label, (make, _) in _variants().items():
            variables = [keras.Variable(tf.zeros((n,))) for n in sizes]
            optimizer = make()
            optimizer.build(variables)
            step = tf.function(_applier(optimizer, grads, variables),
                               jit_compile=jit)
            steps[label + suffix] = (step, _tf_sync(optimizer))
        results.update(_measure(steps, repeats))
        del steps
        _release()
    return results


def run_tensorflow_sparse(rows, repeats, dim=64, touched=4096):
    """An embedding table's sparse gradient: dense steps vs lazy_sparse."""
    import keras
    import tensorflow as tf

    from keras_adam_plus import AdamPlus

    indices = tf.random.uniform((touched,), 0, rows, tf.int64, seed=0)
    grads = [tf.IndexedSlices(tf.random.normal((touched, dim)), indices,
                              tf.constant([rows, dim], tf.int64))]
    makers = {"keras Adam": keras.optimizers.Adam, "AdamPlus": AdamPlus,
              "AdamPlus lazy_sparse": lambda: AdamPlus(lazy_sparse=True)}
    steps = {}
    for label, make in makers.items():
        variables = [keras.Variable(tf.zeros((rows, dim)))]
        optimizer = make()
        optimizer.build(variables)
        steps[label + " (tf.function)"] = (
            tf.function(_applier(optimizer, grads, variables)),
            _tf_sync(optimizer),
        )
    return _measure(steps, repeats)


def run_jax(sizes, repeats):
    import jax
    import jax.numpy as jnp
    import keras

    steps = {}
    key = jax.random.PRNGKey(0)
    grads = [jax.random.normal(key, (n,)) for n in sizes]
    for label, (make, _) in _variants().items():
        variables = [keras.Variable(jnp.zeros((n,))) for n in sizes]
        optimizer = make()
        optimizer.build(variables)
        # As model.fit runs it: stateless, jitted, buffers donated, the
        # arguments in the order of the results (trainable, optimizer).
        # Donated inputs are paired with outputs of the same shape in
        # order; stateless_apply's own order (optimizer, grads, trainable)
        # pairs m with theta, v with m and theta with v, and XLA then
        # copies every buffer (4 extra passes: ~6x the floor, not ~1.4x).
        state = {"t": [v.value for v in variables],
                 "o": [v.value for v in optimizer.variables]}
        del variables
        apply = jax.jit(
            lambda t_vars, o_vars, g, opt=optimizer: opt.stateless_apply(
                o_vars, g, t_vars
            ),
            donate_argnums=(0, 1),
        )

        def step(apply=apply, state=state):
            state["t"], state["o"] = apply(state["t"], state["o"], grads)

        steps[label] = (
            step, lambda s=state: jax.block_until_ready(s["t"])
        )
    try:
        import optax
    except ImportError:
        return _measure(steps, repeats)
    if SELECTED:
        return _measure(steps, repeats)
    tx = optax.adam(1e-3)
    state = {"p": [jnp.zeros((n,)) for n in sizes]}
    state["s"] = tx.init(state["p"])

    def _update(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(_update, donate_argnums=(0, 1))

    def optax_step():
        state["p"], state["s"] = update(state["p"], state["s"], grads)

    steps["optax adam (jit)"] = (
        optax_step, lambda: jax.block_until_ready(state["p"])
    )
    steps["plain JAX loop (jit)"] = _plain_jax_loop(sizes, grads)
    steps["plain JAX flat m, v (jit)"] = _plain_jax_loop(sizes, grads,
                                                         flat=True)
    return _measure(steps, repeats)


def _plain_jax_loop(sizes, grads, flat=False):
    """The room left: a bare jitted Adam, buffers donated.

    m, v and theta per variable with the step's scalars computed once; no
    Keras around it. With `flat`, every variable's m and v are one flat
    buffer each (the gradients concatenated every step, theta cut back
    per variable): what grouping all variables would give. Not optimizers
    users can call: the rows show what XLA makes of the arithmetic alone.
    """
    import jax
    import jax.numpy as jnp

    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)

    def moments(m, v, x):
        return 0.9 * m + 0.1 * x, 0.999 * v + 0.001 * x * x

    def decrement(m, v, c1, c2):
        return 1e-3 * (m / c1) / (jnp.sqrt(v / c2) + 1e-8)

    def update(params, ms, vs, count, g):
        count = count + 1
        t = count.astype(jnp.float32)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        if flat:
            m, v = moments(ms, vs, jnp.concatenate(g))
            d = decrement(m, v, c1, c2)
            return ([p - d[a:b] for p, a, b in
                     zip(params, offsets, offsets[1:])], m, v, count)
        out = [], [], []
        for p, m, v, x in zip(params, ms, vs, g):
            m, v = moments(m, v, x)
            p = p - decrement(m, v, c1, c2)
            for column, value in zip(out, (p, m, v)):
                column.append(value)
        return (*out, count)

    state = [[jnp.zeros((n,)) for n in sizes]]
    if flat:
        state += [jnp.zeros((offsets[-1],)) for _ in range(2)]
    else:
        state += [[jnp.zeros((n,)) for n in sizes] for _ in range(2)]
    state.append(jnp.zeros((), jnp.int32))
    update = jax.jit(update, donate_argnums=(0, 1, 2, 3))

    def step():
        state[:] = update(*state, grads)

    return step, lambda: jax.block_until_ready(state[0])


def _mlp():
    import keras

    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(1000, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(1000, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])


def _resnet():
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                       classes=10)


# name -> (model builder, input shape, batch size). ResNet50 at 32x32 has
# 214 trainable variables (23.6M parameters): the many-variable case.
FIT_MODELS = {
    "MLP 784-1000-1000-10": (_mlp, (784,), 128),
    "ResNet50 (214 variables), 32x32": (_resnet, (32, 32, 3), 16),
}


def fit_step_time(steps, rounds=5, model_name="MLP 784-1000-1000-10"):
    """Median `model.fit` batch time of a model, per optimizer.

    `model_name` is a key of `FIT_MODELS` (random inputs of its shape).
    The models train in alternating epochs of `steps` batches, `rounds`
    times each, so that drift in the machine's speed hits both alike.
    """
    import keras
    import numpy as np

    build, shape, batch = FIT_MODELS[model_name]
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, *shape), dtype=np.float32)
    y = rng.integers(0, 10, batch * steps)
    models, times = {}, {}
    for label in ("keras Adam", "AdamPlus"):
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=keras_variants()[label][0](),
                      loss="sparse_categorical_crossentropy")
        model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, epochs=1,
                  verbose=0)
        models[label], times[label] = model, []
    for _ in range(rounds):
        for label, model in models.items():
            ends = []
            timer = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs, ends=ends: ends.append(
                    time.perf_counter()
                )
            )
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                      callbacks=[timer])
            times[label] += [b - a for a, b in zip(ends, ends[1:])]
    keras.utils.clear_session()
    return {label: statistics.median(t) for label, t in times.items()}


RUNNERS = {"torch": run_torch, "tensorflow": run_tensorflow, "jax": run_jax}


def worker(quick, repeats, cases=None, fit=True, steps=True):
    """Runs the cases on the current backend; prints and returns a table.

    `cases`: names of `CASES` to run (default all, or the quick ones);
    `fit`: whether to time `model.fit` of `FIT_MODELS` too; `steps`:
    whether to time the optimizer steps (the cases) at all.
    """
    import keras

    import keras_adam_plus

    backend = keras.backend.backend()
    rows, bw = [], 0.0
    table_cases = QUICK_CASES if quick else CASES
    if accelerator():
        table_cases = QUICK_CASES if quick else GPU_CASES
    unknown = set(cases or ()) - set(table_cases)
    if unknown:
        raise SystemExit(
            f"--case {sorted(unknown)} is not a case on this device "
            f"({'GPU' if accelerator() else 'CPU'}); its cases: "
            f"{', '.join(table_cases)}")
    if not steps:
        table_cases = {}
    for case, sizes in table_cases.items():
        if cases and case not in cases:
            continue
        n = sum(sizes)
        bw = bandwidth(repeats, n)
        floor = BYTES_PER_PARAM * n / bw
        print(f"# {backend} {case}: measuring", file=sys.stderr,
              flush=True)
        times = RUNNERS[backend](sizes, repeats)
        _release()
        rows.append({"case": case, "floor_s": floor, "times": times})
    if (backend == "tensorflow" and steps and not cases
            and not accelerator()):
        table_rows = 100_000 if quick else 1_000_000
        case = f"{table_rows // 1000}k x 64 embedding, 4096 rows touched"
        print(f"# {backend} {case}: measuring", file=sys.stderr, flush=True)
        times = run_tensorflow_sparse(table_rows, repeats)
        _release()
        bw = bandwidth(repeats, table_rows * 64)
        rows.append({"case": case, "times": times,
                     "floor_s": BYTES_PER_PARAM * table_rows * 64 / bw})
    fits = {}
    for name in (FIT_MODELS if fit else ()):
        print(f"# {backend} model.fit {name}: measuring", file=sys.stderr,
              flush=True)
        fits[name] = fit_step_time(8 if quick else 20,
                                   rounds=2 if quick else 5, model_name=name)
    table = {"backend": backend + (" (GPU)" if accelerator() else ""),
             "bandwidth_gb_s": bw / 1e9, "rows": rows,
             "fit": fits, "versions": {
                 "keras": keras.__version__,
                 "keras_adam_plus": keras_adam_plus.__version__}}
    print_table(table)
    return table


def print_table(table):
    bandwidth = (f"  (streaming bandwidth {table['bandwidth_gb_s']:.1f} GB/s)"
                 if table["rows"] else "")
    print(f"\n## {table['backend']}{bandwidth}\n")
    if table["rows"]:
        print("| case | optimizer | ms/step | x floor | x keras peer |")
        print("| --- | --- | ---: | ---: | ---: |")
    for row in table["rows"]:
        floor, times = row["floor_s"], row["times"]
        print(f"| {row['case']} | floor (28 B/param) | "
              f"{1e3 * floor:.2f} | 1.00 | |")
        for label, seconds in times.items():
            keras_time = times.get(peer_of(label, times))
            versus = f"{seconds / keras_time:.2f}" if keras_time else ""
            print(f"| {row['case']} | {label} | {1e3 * seconds:.2f} | "
                  f"{seconds / floor:.2f} | {versus} |")
    for name, fit in (table["fit"] or {}).items():
        batch = FIT_MODELS[name][2]
        print(f"\nmodel.fit, {name}, batch {batch}: "
              f"keras Adam {1e3 * fit['keras Adam']:.1f} ms/step, AdamPlus "
              f"{1e3 * fit['AdamPlus']:.1f} ms/step, ratio "
              f"{fit['AdamPlus'] / fit['keras Adam']:.3f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, action="append",
                   help="backend(s) to run (default: all three)")
    p.add_argument("--quick", action="store_true",
                   help="1M-parameter cases only: a smoke run")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per measurement (default 30, quick 5)")
    p.add_argument("--case", action="append",
                   choices=list(CASES) + list(QUICK_CASES) + list(GPU_CASES),
                   help="case(s) to run (default: all; not the embedding)")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the model.fit timing")
    p.add_argument("--no-steps", action="store_true",
                   help="skip the optimizer steps (only model.fit)")
    p.add_argument("--variant", action="append",
                   choices=list(keras_variants_labels()),
                   help="keras variant row(s) to time (default: all, and "
                        "the frameworks' own Adam)")
    p.add_argument("--json", metavar="FILE", help="also write the tables")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 30)
    global SELECTED
    SELECTED = args.variant
    if args.worker:
        print("@@" + json.dumps(worker(args.quick, repeats, args.case,
                                       not args.no_fit, not args.no_steps)),
              flush=True)
        return 0
    tables = []
    for backend in args.backend or BACKENDS:
        cmd = [sys.executable, __file__, "--worker", "--repeats",
               str(repeats)] + (["--quick"] if args.quick else []) + [
            f"--case={case}" for case in args.case or []] + (
            ["--no-fit"] if args.no_fit else []) + (
            ["--no-steps"] if args.no_steps else []) + [
            f"--variant={label}" for label in args.variant or []]
        # On a GPU, JAX takes its memory as it goes, as torch does (the
        # floor is probed through torch on the same GPU).
        env = dict(os.environ, KERAS_BACKEND=backend,
                   TF_CPP_MIN_LOG_LEVEL="3")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                text=True)
        for line in proc.stdout:
            if line.startswith("@@"):
                tables.append(json.loads(line[2:]))
            else:
                print(line, end="", flush=True)
        if proc.wait():
            return proc.returncode
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
