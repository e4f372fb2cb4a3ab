"""lossport: several outputs, several losses. Declare, balance, train and inspect multi-output PyTorch nets."""

from .errors import LossSpecError, NonFiniteLossError
from .result_types import Losses

__all__ = ["LossSpecError", "NonFiniteLossError", "Losses"]
__version__ = "0.1.0"
