"""tuning: sweep AdamPlus's hyperparameters through keras-tuner.

Public names: `sweep`, `confirm`, `SweepResult`, `SearchSpace`,
`BENCHMARKS`, `AdamPlusHyperModel`.

Importing the package loads no Keras (`AdamPlusHyperModel` is imported on
first access), so `python -m tuning` checks its arguments in a fraction of a
second.
"""

from tuning.benchmarks import BENCHMARKS
from tuning.confirm import confirm
from tuning.report import SweepResult
from tuning.search_space import SearchSpace
from tuning.sweep import sweep

__all__ = ["BENCHMARKS", "AdamPlusHyperModel", "SearchSpace", "SweepResult",
           "confirm", "sweep"]


def __getattr__(name):
    if name == "AdamPlusHyperModel":
        from tuning.hypermodel import AdamPlusHyperModel

        return AdamPlusHyperModel
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")
