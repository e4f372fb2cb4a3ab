"""lossport: several outputs, several losses. Declare, balance, train and inspect multi-output PyTorch nets."""

from . import balance, callbacks, data, distributed, losses, metrics, toy
from .compare import compare
from .errors import LossSpecError, NonFiniteLossError
from .history import History, Result
from .inspection import Monitor, inspect
from .objective import Objective
from .report import Report
from .result_types import Losses
from .spec import L1, L2, CustomLoss, Scaled
from .train import evaluate, train

__all__ = [
    "train",
    "evaluate",
    "Result",
    "History",
    "Objective",
    "Losses",
    "Scaled",
    "CustomLoss",
    "L1",
    "L2",
    "LossSpecError",
    "NonFiniteLossError",
    "losses",
    "inspect",
    "Report",
    "Monitor",
    "compare",
    "balance",
    "callbacks",
    "data",
    "distributed",
    "toy",
    "metrics",
]
__version__ = "0.1.0"
