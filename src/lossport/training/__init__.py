"""Training: :func:`train` (the round loop, :mod:`.loop`), :func:`evaluate`, checkpoints (:mod:`.state`), one
step (:mod:`.step`), the data layer (:mod:`.data`) and the run's set-up (:mod:`.setup`)."""

from .data import DataSource, make_source
from .evaluate import evaluate
from .loop import TrainOptions, train
from .state import CHECKPOINT_NAME, TrainingState, load_checkpoint
from .step import StepOutcome, Stepper

__all__ = [
    "CHECKPOINT_NAME",
    "DataSource",
    "StepOutcome",
    "Stepper",
    "TrainOptions",
    "TrainingState",
    "evaluate",
    "load_checkpoint",
    "make_source",
    "train",
]
