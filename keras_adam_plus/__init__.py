"""keras-adam-plus: an exact, validated Adam optimizer for Keras 3.

Public names: `AdamPlus`, `InverseSqrtDecay`, `BetaDecay` and `__version__`.
"""

from keras_adam_plus.adam_plus import AdamPlus
from keras_adam_plus.schedules import BetaDecay, InverseSqrtDecay

__version__ = "0.1.0"

__all__ = ["AdamPlus", "BetaDecay", "InverseSqrtDecay", "__version__"]
