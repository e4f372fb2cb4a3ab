"""The best value of a history key, for the best net and early stopping."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class Tracker:
    """Best value of one history key. ``maximise`` says which way is better (set from
    :func:`lossport.metrics.higher_is_better` or the user's ``mode``); NaN values never improve."""

    def __init__(self, key: str, min_delta: float = 0.0, patience: int = 0) -> None:
        self.key, self.min_delta, self.patience = key, float(min_delta), int(patience)
        self.maximise = False
        self.best: float | None = None
        self.round: int | None = None
        self.wait = 0
        self.nonfinite = 0

    def update(self, value: float, round_: int) -> bool:
        """Record a round's value; True when it improves on the best by more than ``min_delta``."""
        if not math.isfinite(value):
            self.nonfinite += 1
            improved = False
        elif self.best is None:
            improved = True
        elif self.maximise:
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.round, self.wait = value, round_, 0
        else:
            self.wait += 1
        return improved

    def describe(self) -> str:
        """Which round is best and why, in words."""
        if self.best is None:
            return f"{self.key} was never finite ({self.nonfinite} rounds NaN or inf), so no round is best"
        way = "highest" if self.maximise else "lowest"
        note = f"; {self.nonfinite} rounds with a non-finite {self.key} were passed over" if self.nonfinite else ""
        return f"round {self.round} has the {way} {self.key} ({self.best:.6g}){note}"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "round": self.round, "wait": self.wait, "nonfinite": self.nonfinite}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.best, self.round, self.wait = s["best"], s["round"], int(s["wait"])
        self.nonfinite = int(s.get("nonfinite", 0))


__all__ = ["Tracker"]
