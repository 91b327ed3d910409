"""keras-adam-plus: an exact, validated Adam optimizer for Keras 3.

Public names: `AdamPlus`, `InverseSqrtDecay`, `BetaDecay`,
`layer_decay_groups` and `__version__`.
"""

import keras

from keras_adam_plus.adam_plus import AdamPlus
from keras_adam_plus.groups import layer_decay_groups
from keras_adam_plus.schedules import BetaDecay, InverseSqrtDecay

# Short names for `compile(optimizer="adam_plus")`: Keras resolves a string
# identifier through its global custom objects, a public dict for updates.
for _alias in ("adam_plus", "AdamPlus"):
    keras.saving.get_custom_objects().setdefault(_alias, AdamPlus)

__version__ = "0.1.0"

__all__ = ["AdamPlus", "BetaDecay", "InverseSqrtDecay", "layer_decay_groups",
           "__version__"]
