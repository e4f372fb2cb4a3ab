"""Progress display of a training run (a tqdm bar per round, or one line per round) and the round's running
statistics (parts averaged over labelled examples, everything else over batches)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any


class RoundStats:
    """Accumulates one round: parts over labelled examples, the total over examples, the rest over batches."""

    def __init__(self) -> None:
        self.part_sum: dict[str, float] = {}
        self.part_n: dict[str, int] = {}
        self.loss_sum = 0.0
        self.examples = 0
        self.batches = 0
        self.other_sum: dict[str, float] = {}
        self.other_n: dict[str, int] = {}
        self.skipped = 0

    def add(
        self,
        part_values: Mapping[str, float],
        counts: Mapping[str, int],
        total: float,
        bs: int,
        other: Mapping[str, float],
    ) -> None:
        for k, v in part_values.items():
            n = counts.get(k, bs)
            self.part_sum[k] = self.part_sum.get(k, 0.0) + v * n
            self.part_n[k] = self.part_n.get(k, 0) + n
        self.loss_sum += total * bs
        self.examples += bs
        self.batches += 1
        for k, v in other.items():
            self.other_sum[k] = self.other_sum.get(k, 0.0) + v
            self.other_n[k] = self.other_n.get(k, 0) + 1

    def part_means(self) -> dict[str, float]:
        return {k: self.part_sum[k] / self.part_n[k] for k in self.part_sum if self.part_n[k] > 0}

    def row(self, part_order: Sequence[str], static: Mapping[str, float] | None = None) -> dict[str, float]:
        """The round's values; ``static`` gives the weights when they are the same in every batch."""
        out: dict[str, float] = {"loss": self.loss_sum / self.examples if self.examples else math.nan}
        means = self.part_means()
        present = [k for k in [*part_order, *(k for k in means if k not in part_order)] if k in means]
        for k in present:
            out[k] = means[k]
        if static is not None:
            for k in present:
                out[f"weight/{k}"] = float(static.get(k, 1.0))
        for k in self.other_sum:
            out[k] = self.other_sum[k] / self.other_n[k]
        return out


class Progress:
    """``True``/``"auto"``: a bar on a terminal, lines otherwise; ``"bar"``, ``"lines"``, ``False``."""

    def __init__(self, mode: Any, epochs: int) -> None:
        if mode is True or mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode not in (False, None, "bar", "lines"):
            raise ValueError(f"progress={mode!r}: use True, False, 'bar' or 'lines'")
        self.mode = mode or None
        self.epochs = epochs
        self.bar: Any = None
        self._last = 0.0

    def begin_round(self, r: int, total: int | None) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=f"round {r}/{self.epochs}", leave=True, file=sys.stderr, dynamic_ncols=True
            )

    def batch(self, stats: RoundStats | None, part_order: Sequence[str]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if stats is not None and now - self._last > 0.2:
            self._last = now
            self.bar.set_postfix_str(_line(stats.row(part_order)), refresh=False)

    def end_round(self, r: int, row: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_line(row, skip=("round", "seconds", "lr")), refresh=True)
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            print(
                f"round {r}/{self.epochs} - {row.get('seconds', 0):.2f}s - " + _line(row, skip=("round", "seconds")),
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _line(row: Mapping[str, float], skip: Sequence[str] = ()) -> str:
    return " - ".join(f"{k}: {v:.4g}" for k, v in row.items() if k not in skip and not k.startswith("balancer/"))


__all__ = ["Progress", "RoundStats"]
