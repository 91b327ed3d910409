"""keras-adam-plus: an exact, validated Adam optimizer for Keras 3.

Public names: `AdamPlus` and `__version__`.
"""

from keras_adam_plus.adam_plus import AdamPlus

__version__ = "0.1.0"

__all__ = ["AdamPlus", "__version__"]
