"""Data-parallel training over 2 CPU devices equals one device, to round-off.

Each run is a fresh process: the device count is fixed before the backend
starts (logical devices on TensorFlow, XLA_FLAGS on JAX).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

COMMON = """
import json
import numpy as np
import keras
from keras_adam_plus import AdamPlus

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")
CONFIGS = [{}, {"amsgrad": True, "weight_decay": 0.01},
           {"nesterov": True, "average_decay": 0.9},
           {"skip_nonfinite": True}]


def model(config):
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((6,)),
                          keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(1)])
    m.compile(optimizer=AdamPlus(learning_rate=0.01, **config), loss="mse")
    return m


def fit(m):
    m.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return m.get_weights()


def report(pairs):
    initial = model({}).get_weights()
    print("@@" + json.dumps([
        [max(float(np.abs(p - q).max()) for p, q in zip(a, b)),
         max(float(np.abs(p - q).max()) for p, q in zip(a, initial))]
        for a, b in pairs]))
"""

SCRIPTS = {
    "tensorflow": """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + COMMON + """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
pairs = []
for config in CONFIGS:
    with strategy.scope():
        mirrored = model(config)
    pairs.append((fit(mirrored), fit(model(config))))
report(pairs)
""",
    "jax": COMMON + """
import jax
devices = jax.devices("cpu")
assert len(devices) == 2, devices
pairs = []
for config in CONFIGS:
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices))
    parallel = fit(model(config))
    keras.distribution.set_distribution(None)
    pairs.append((parallel, fit(model(config))))
report(pairs)
""",
}


def _run(script, backend, devices):
    """Runs `script` in a fresh process with `devices` host devices.

    The device count is fixed before the backend starts; the script prints
    one JSON line behind "@@", returned here.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env,
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines()
             if line.startswith("@@")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[0][2:])


_multi_device = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's torch backend has no multi-device distribution on CPU "
    "(keras.distribution is JAX-only; tf.distribute is TensorFlow's)",
)


@_multi_device
def test_two_devices_equal_one_device():
    backend = keras.backend.backend()
    result = _run(SCRIPTS[backend], backend, devices=2)
    for difference, moved in result:
        assert moved > 0.01
        assert difference < 1e-6


SHARDING = """
import json
import jax
import keras
from keras_adam_plus import AdamPlus

devices = jax.devices("cpu")
assert len(devices) == 8, devices
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
layout_map = keras.distribution.LayoutMap(mesh)
layout_map[".*kernel"] = (None, "model")
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map,
                                     batch_dim_name="batch"))
result = {}
for moment_dtype in (None, "float32"):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(8, dtype="bfloat16")])
    optimizer = AdamPlus(moment_dtype=moment_dtype, amsgrad=True,
                         average_decay=0.9)
    optimizer.build(model.trainable_variables)
    kernel = model.trainable_variables[0]
    slots = [s for s in optimizer.variables if s.name.startswith(
        kernel.path.replace("/", "_"))]
    result[str(moment_dtype)] = {
        "kernel": str(kernel.value.sharding.spec),
        "slots": sorted({str(s.value.sharding.spec) for s in slots}),
        "dtypes": sorted({str(s.dtype) for s in slots}),
        "count": len(slots),
    }
print("@@" + json.dumps(result))
"""


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution's layouts (ModelParallel) are JAX-only",
)
def test_slots_follow_the_weights_sharding():
    # Was: moment_dtype="float32" slots replicated, P(None, None).
    result = _run(SHARDING, "jax", devices=8)
    for moment_dtype, dtype in (("None", "bfloat16"), ("float32", "float32")):
        got = result[moment_dtype]
        assert got["kernel"] in ("P(None, 'model')",
                                 "PartitionSpec(None, 'model')")
        assert got["slots"] == [got["kernel"]], got
        assert got["dtypes"] == [dtype]
        assert got["count"] == 4  # momentum, velocity, max, average


NAN_COMMON = """
import json
import numpy as np
import keras
from keras_adam_plus import AdamPlus

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.normal(size=(16, 1)).astype("float32")
x[0, 2] = np.nan  # the first example: on the first replica only


def model():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    m.compile(optimizer=AdamPlus(learning_rate=0.1, skip_nonfinite=True),
              loss="mse")
    return m


def run(m):
    initial = [w.copy() for w in m.get_weights()]
    m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    o = m.optimizer
    return {"weights": [w.tolist() for w in m.get_weights()],
            "moved": max(float(np.abs(a - b).max())
                         for a, b in zip(m.get_weights(), initial)),
            "skipped": int(keras.ops.convert_to_numpy(o.skipped_steps)),
            "iterations": int(keras.ops.convert_to_numpy(o.iterations))}
"""

NAN_SCRIPTS = {
    "tensorflow": SCRIPTS["tensorflow"].split("import json")[0]
    + NAN_COMMON + """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = model()
print("@@" + json.dumps({"parallel": run(mirrored), "single": run(model())}))
""",
    "jax": NAN_COMMON + """
import jax
devices = jax.devices("cpu")
assert len(devices) == 2, devices
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=devices))
parallel = run(model())
keras.distribution.set_distribution(None)
print("@@" + json.dumps({"parallel": parallel, "single": run(model())}))
""",
}


@_multi_device
def test_nan_on_one_replica_skips_the_step_on_every_replica():
    # Was (MirroredStrategy): each replica decided on its own gradients,
    # so the finite replica applied the NaN-tainted all-reduced update:
    # every weight NaN while skipped_steps read 1.
    backend = keras.backend.backend()
    result = _run(NAN_SCRIPTS[backend], backend, devices=2)
    for run in result.values():
        # The batch with the NaN skipped, the other one taken.
        assert run["skipped"] == 1 and run["iterations"] == 1, run
        assert run["moved"] > 0.01
    for a, b in zip(result["parallel"]["weights"],
                    result["single"]["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
