"""Callbacks of :func:`lossport.train`, and the loggers (CSV, JSON, TensorBoard) built on them.

A callback is a :class:`Callback` subclass overriding any of the hooks below, or a plain function
``fn(state) -> bool | str | None`` called at the end of every round (Wolfram's ``TrainingProgressFunction``);
any hook can stop training with ``state.stop("reason")`` and a function can also return ``True`` or
``"stop"``. Training stops after the current batch (batch hooks) or round (round hooks); the round in which
it stops is completed, recorded and checkpointed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .history import History


@dataclass
class TrainState:
    """What a callback sees. ``round`` is 1-based; ``batch`` is the 0-based index within the round;
    ``logs`` holds the values of the current batch (batch hooks) or round (round hooks)."""

    net: nn.Module
    optimizer: Any
    objective: Any
    history: History
    epochs: int
    round: int = 0
    batch: int = -1
    logs: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None

    def stop(self, reason: str = "stopped by a callback") -> None:
        """Ask training to stop (after the current batch or round)."""
        self.stop_reason = reason


class Callback:
    """Base class: override the hooks you need. A callback with ``state_dict``/``load_state_dict`` has them
    saved in and restored from checkpoints."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first round (also when resuming)."""

    def on_round_begin(self, state: TrainState) -> None:
        """Before the first batch of a round."""

    def on_batch_end(self, state: TrainState) -> None:
        """After each batch (``state.logs``: ``loss`` and the parts of the batch)."""

    def on_round_end(self, state: TrainState) -> None:
        """After a round, its validation and its history row (``state.logs``), before its checkpoint."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last round."""


class FunctionCallback(Callback):
    """Wraps ``fn(state)`` as a round-end callback; a return value of ``True`` or ``"stop"`` stops
    training."""

    def __init__(self, fn: Callable[[TrainState], Any]) -> None:
        self.fn = fn

    def on_round_end(self, state: TrainState) -> None:
        out = self.fn(state)
        if out is True or (isinstance(out, str) and out.lower() in ("stop", "stoptraining")):
            state.stop(f"callback {getattr(self.fn, '__name__', 'function')} returned {out!r}")


def as_callback(cb: Any) -> Callback:
    if isinstance(cb, Callback):
        return cb
    if callable(cb):
        return FunctionCallback(cb)
    raise TypeError(f"callbacks must be lossport.callbacks.Callback instances or functions, not {type(cb).__name__}")


class CSVLogger(Callback):
    """Rewrites ``path`` with the whole per-round history after every round (atomically)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def on_round_end(self, state: TrainState) -> None:
        state.history.to_csv(self.path)


class JSONLogger(Callback):
    """Rewrites ``path`` with the history (rounds and batches) as JSON after every round (atomically)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def on_round_end(self, state: TrainState) -> None:
        state.history.to_json(self.path)


class TensorBoardLogger(Callback):
    """Every per-round key as a scalar (``val_`` keys under the same tag with a ``val/`` prefix) and the
    per-batch total. Needs the optional extra: ``pip install 'lossport[tensorboard]'``."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "log='tensorboard:DIR' needs the tensorboard package: pip install 'lossport[tensorboard]' "
                "(or log to CSV with log='csv:PATH')"
            ) from e
        self.writer = SummaryWriter(log_dir=str(logdir))
        self._batches = 0

    def on_batch_end(self, state: TrainState) -> None:
        self._batches += 1
        if "loss" in state.logs:
            self.writer.add_scalar("batch/loss", state.logs["loss"], self._batches)

    def on_round_end(self, state: TrainState) -> None:
        for k, v in state.logs.items():
            if k == "round":
                continue
            tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
            self.writer.add_scalar(tag, v, state.round)
        self.writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        self.writer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._batches = int(state["batches"])


def loggers(log: Any) -> list[Callback]:
    """``log=``: ``None``; ``"csv:PATH"`` or a path ending in ``.csv``; ``"json:PATH"`` or ``.json``;
    ``"tensorboard:DIR"``; or a list of these."""
    if log is None:
        return []
    if isinstance(log, (list, tuple)):
        return [lg for item in log for lg in loggers(item)]
    if not isinstance(log, (str, os.PathLike)):
        raise TypeError(f"log must be a string like 'csv:history.csv' or 'tensorboard:runs/x', not {log!r}")
    s = os.fspath(log)
    kind, _, rest = s.partition(":")
    if rest and kind.lower() in ("csv", "json", "tensorboard", "tb"):
        kind = kind.lower()
        if kind == "csv":
            return [CSVLogger(rest)]
        if kind == "json":
            return [JSONLogger(rest)]
        return [TensorBoardLogger(rest)]
    if s.lower().endswith(".csv"):
        return [CSVLogger(s)]
    if s.lower().endswith(".json"):
        return [JSONLogger(s)]
    raise ValueError(
        f"log={s!r}: say where and how to log: 'csv:PATH', 'json:PATH', 'tensorboard:DIR' or a path ending in .csv"
    )


__all__ = [
    "CSVLogger",
    "Callback",
    "FunctionCallback",
    "JSONLogger",
    "TensorBoardLogger",
    "TrainState",
    "loggers",
]
