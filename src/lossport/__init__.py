"""lossport: several outputs, several losses. Declare, balance, train and inspect multi-output PyTorch nets."""

from . import balance, losses
from .errors import LossSpecError, NonFiniteLossError
from .objective import Objective
from .result_types import Losses
from .spec import L1, L2, CustomLoss, Scaled

__all__ = [
    "Objective",
    "Losses",
    "Scaled",
    "CustomLoss",
    "L1",
    "L2",
    "LossSpecError",
    "NonFiniteLossError",
    "losses",
    "balance",
]
__version__ = "0.1.0"
