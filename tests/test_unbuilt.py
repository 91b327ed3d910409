"""Every public call on an AdamPlus not built yet: Keras's own error, or
what the docstring promises, never an AttributeError on a private name.

Table-driven over the optimizer's options that change a call's path
(`skip_nonfinite`, `average_decay`). Found by review: `stateless_apply`
and `apply` with `skip_nonfinite`, and `average_weights`, raised
AttributeError '_store'.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_adam_plus import AdamPlus

BACKEND = keras.backend.backend()
CONFIGS = {"plain": {}, "skip": dict(skip_nonfinite=True),
           "average": dict(average_decay=0.9),
           "skip_average": dict(skip_nonfinite=True, average_decay=0.9)}


def _variable():
    return keras.Variable(np.ones((3,), "float32"))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_stateless_apply_gives_keras_error(config):
    variable = _variable()
    with pytest.raises(ValueError, match="AdamPlus must be built|not "
                       "supported with the TensorFlow backend"):
        AdamPlus(**CONFIGS[config]).stateless_apply(
            [], [ops.ones((3,))], [variable.value])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_apply_without_variables_gives_keras_error(config):
    with pytest.raises(ValueError) as info:
        AdamPlus(**CONFIGS[config]).apply([ops.ones((3,))])
    assert "_store" not in str(info.value)


@pytest.mark.parametrize("config", ["average", "skip_average"])
def test_average_weights_before_a_step_are_the_values(config):
    variable = _variable()
    optimizer = AdamPlus(**CONFIGS[config])
    got = optimizer.average_weights([variable])
    np.testing.assert_array_equal(ops.convert_to_numpy(got[0]), np.ones(3))
    with pytest.raises(ValueError, match="needs `var_list`"):
        optimizer.average_weights()
    with optimizer.use_average_weights([variable]) as swapped:
        np.testing.assert_array_equal(ops.convert_to_numpy(swapped[0]),
                                      np.ones(3))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_properties_before_build(config):
    optimizer = AdamPlus(**CONFIGS[config])
    assert optimizer.skipped_steps is None
    assert optimizer.fast_path.startswith(
        {"torch": "torch_fused", "jax": "generic",
         "tensorflow": "generic"}[BACKEND])
    if "average" not in config:
        with pytest.raises(ValueError, match="needs AdamPlus\\(average"):
            optimizer.average_weights([_variable()])
