"""tuning: sweep AdamPlus's hyperparameters through keras-tuner.

Public names: `sweep`, `SweepResult`, `SearchSpace`, `BENCHMARKS`,
`AdamPlusHyperModel`.
"""

from tuning.benchmarks import BENCHMARKS
from tuning.hypermodel import AdamPlusHyperModel
from tuning.report import SweepResult
from tuning.search_space import SearchSpace
from tuning.sweep import sweep

__all__ = ["BENCHMARKS", "AdamPlusHyperModel", "SearchSpace", "SweepResult",
           "sweep"]
