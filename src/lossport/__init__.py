"""lossport: several outputs, several losses. Declare, balance, train and inspect multi-output PyTorch nets."""

from . import balance, callbacks, data, distributed, losses, metrics, toy, training
from .aliases import BalanceSpec, DataLike, LossSpec
from .comparison import Comparison, compare, delta_m
from .errors import CheckpointError, LossSpecError, NonFiniteLossError
from .history import History, Result
from .inspection import Monitor, inspect
from .objective import Objective
from .report import Report
from .result_types import Losses
from .spec import L1, L2, CustomLoss, Scaled
from .training import evaluate, load_checkpoint, train

__all__ = [
    "L1",
    "L2",
    "BalanceSpec",
    "CheckpointError",
    "Comparison",
    "CustomLoss",
    "DataLike",
    "History",
    "LossSpec",
    "LossSpecError",
    "Losses",
    "Monitor",
    "NonFiniteLossError",
    "Objective",
    "Report",
    "Result",
    "Scaled",
    "balance",
    "callbacks",
    "compare",
    "data",
    "delta_m",
    "distributed",
    "evaluate",
    "inspect",
    "load_checkpoint",
    "losses",
    "metrics",
    "toy",
    "train",
    "training",
]
__version__ = "0.1.0"
