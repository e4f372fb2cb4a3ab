"""What training gives back: :class:`History` (per round and per batch) and :class:`Result` (Wolfram's
``NetTrainResultsObject``).

History keys, per round (``history["digit"]`` is the list over rounds, NaN where a round has no value):

==========================  ========================================================================
``round``                   1, 2, ...
``loss``                    training total (the backpropagated ``sum_i w_i L_i + extra``), mean over the
                            round's batches weighted by batch size (Keras, Wolfram). Always the total: no
                            part is named ``loss`` (an output named ``loss`` gives parts ``loss/<loss>``;
                            ``lossport.result_types.TOTAL_KEY`` and ``part_key``)
``<part>``                  unweighted loss part, averaged over the round's labelled examples of that part;
                            absent (NaN) in a round where no batch had a labelled example
``weight/<part>``           the applied weight ``s_i b_i``, mean over the batches where the part was present
``<extra>``                 regularization and balancer terms (``l2``, ...), mean over batches
``balancer/<key>``          the balancer's diagnostics (``balancer.info``), mean over batches
``<output>/<metric>``       training metrics (``metrics=``)
``val_loss``, ``val_<part>``, ``val_<output>/<metric>``   the same on the validation data
                            (:func:`lossport.evaluate`: static weights, no balancer)
``lr``                      learning rate of the first parameter group during the round
``seconds``                 wall time of the round (training and validation)
``skipped``                 batches skipped for a non-finite part (``on_nonfinite="skip"`` only)
==========================  ========================================================================

Per batch (``history.batches``): ``round``, ``batch``, ``loss`` and every part present in the batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_write_text
from .result_types import TOTAL_KEY, part_key


class History:
    """Per-round and per-batch records of a training run (see the module docstring for the keys)."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.batches: list[dict[str, float]] = []

    # -- reading ----------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every per-round key, in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.rounds:
            for k in r:
                seen.setdefault(k, None)
        return list(seen)

    def __getitem__(self, key: str) -> list[float]:
        if not any(key in r for r in self.rounds):
            raise KeyError(f"no history key {key!r}; keys are {self.keys()}")
        return [r.get(key, math.nan) for r in self.rounds]

    def __iter__(self) -> Iterator[str]:
        """The keys, as :meth:`keys` lists them (a History reads like a mapping of key -> values per round)."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return any(key in r for r in self.rounds)

    def __len__(self) -> int:
        return len(self.rounds)

    @property
    def last(self) -> dict[str, float]:
        """The last round's values."""
        if not self.rounds:
            raise IndexError("the history is empty")
        return self.rounds[-1]

    def batch_values(self, key: str) -> list[float]:
        """A per-batch key over all batches (NaN where absent)."""
        return [b.get(key, math.nan) for b in self.batches]

    # -- writing -------------------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """Rounds as CSV (one row per round, one column per key, empty cell where absent); written atomically
        to ``path`` when given. Returns the text."""
        keys = self.keys()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for r in self.rounds:
            w.writerow(["" if k not in r or _isnan(r[k]) else repr(float(r[k])) for k in keys])
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_json(self, path: str | os.PathLike[str] | None = None, *, batches: bool = True) -> str:
        """``{"rounds": [...], "batches": [...]}`` as JSON (NaN and absent values left out); written
        atomically to ``path`` when given. Returns the text."""
        text = json.dumps(self.state_dict(batches=batches), indent=1, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> History:
        """Read what :meth:`to_json` wrote (a path or the JSON text)."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        h = cls()
        h.load_state_dict(json.loads(text))
        return h

    def state_dict(self, *, batches: bool = True) -> dict[str, Any]:
        def clean(rows: Iterable[Mapping[str, float]]) -> list[dict[str, float]]:
            return [{k: float(v) for k, v in r.items() if not _isnan(v)} for r in rows]

        out: dict[str, Any] = {"rounds": clean(self.rounds)}
        if batches:
            out["batches"] = clean(self.batches)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = [dict(r) for r in state["rounds"]]
        self.batches = [dict(b) for b in state.get("batches", [])]

    def __repr__(self) -> str:
        return f"History({len(self.rounds)} rounds, {len(self.batches)} batches, keys={self.keys()})"


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


@dataclass
class Result:
    """The outcome of :func:`lossport.train`.

    * ``net``: the net at the best validation round when validation data was given (Wolfram "TrainedNet";
      a copy), else the final net;
    * ``final_net``: the net after the last round (the object passed to ``train``, trained in place);
    * ``best_round``: the round of ``net`` (1-based), ``None`` without validation;
    * ``history``: :class:`History`;
    * ``stopped_because``: ``"completed"``, ``"early stopping: ..."``, ``"callback: ..."``;
    * ``examples_per_second``: training examples per second of training time (validation excluded);
    * ``best_reason``: which round is best and why, in words (``None`` without validation);
    * ``balanced``: whether a balancer set the training weights: then the training total is the balanced one and
      ``val_loss`` the validation parts with the static weights, and the table and plot say so.
    """

    net: nn.Module
    final_net: nn.Module
    history: History
    best_round: int | None = None
    best_key: str | None = None
    best_reason: str | None = None
    stopped_because: str = "completed"
    examples_per_second: float = math.nan
    seconds: float = 0.0
    part_names: list[str] = field(default_factory=list)
    balanced: bool = False

    @property
    def rounds(self) -> int:
        return len(self.history)

    def table(self) -> str:
        """Per-part table of the last round (and of the best round when there is validation): part, weight,
        train and validation values."""
        if not self.history.rounds:
            return "(no round)"
        last = self.history.last
        best = self.history.rounds[self.best_round - 1] if self.best_round else None
        rows = [["part", "weight", "train", "val"] + (["val (best)"] if best else [])]
        for p in [TOTAL_KEY, *(part_key(q) for q in self.part_names)]:
            w = last.get(f"weight/{p}", math.nan)
            row = [
                p if p != TOTAL_KEY else "total",
                "" if p == TOTAL_KEY else f"{w:.4g}",
                _fmt(last.get(p)),
                _fmt(last.get(f"val_{p}")),
            ]
            if best:
                row.append(_fmt(best.get(f"val_{p}")))
            rows.append(row)
        metric_keys = [k for k in last if "/" in k and not k.startswith(("weight/", "balancer/", "val_"))]
        for k in metric_keys:
            row = [k, "", _fmt(last.get(k)), _fmt(last.get(f"val_{k}"))]
            if best:
                row.append(_fmt(best.get(f"val_{k}")))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        head = f"{self.rounds} rounds, {self.stopped_because}"
        if self.best_round:
            head += f", best round {self.best_round} ({self.best_key})"
        if self.balanced and f"val_{TOTAL_KEY}" in last:
            lines.append("(train total: with the balancer's weights; val total: with the static weights)")
        return head + "\n" + "\n".join(lines)

    def plot(self, path: str | os.PathLike[str] | None = None, *, parts: Iterable[str] | None = None) -> Any:
        """Loss evolution: one panel for the total and one per part, training (solid) and validation (dashed)
        against the round; a panel is on a log scale when all of its values are positive. Returns a
        ``matplotlib.figure.Figure``; saved (PNG by the extension) when ``path`` is given. Needs matplotlib
        (``pip install lossport[plot]``)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Result.plot needs matplotlib: pip install 'lossport[plot]'") from e
        names = [TOTAL_KEY, *(part_key(p) for p in (self.part_names if parts is None else list(parts)))]
        keys = self.history.rounds[-1].keys() if self.history.rounds else ()
        monitor_groups = [g for g in ("cos", "gradnorm", "norm") if any(k.startswith(f"monitor/{g}") for k in keys)]
        n = len(names) + len(monitor_groups)
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        x = self.history["round"] if "round" in self.history else list(range(1, self.rounds + 1))
        for i, name in enumerate(names):
            ax = axes[i // cols][i % cols]
            values: list[float] = []
            static = " (static weights)" if self.balanced and name == TOTAL_KEY else ""
            for key, style, label in ((name, "-", "train"), (f"val_{name}", "--", "validation" + static)):
                if key in self.history:
                    ys = self.history[key]
                    ax.plot(x, ys, style, marker="o", markersize=3, label=label)
                    values += [v for v in ys if not math.isnan(v)]
            if values and all(v > 0 for v in values):
                ax.set_yscale("log")
            if self.best_round:
                ax.axvline(self.best_round, color="grey", lw=0.8, ls=":")
            ax.set_title("total" if name == TOTAL_KEY else name)
            ax.set_xlabel("round")
            if i == 0:
                ax.legend()
        for i, group in enumerate(monitor_groups, start=len(names)):  # train(monitor=...): conflict and pull
            ax = axes[i // cols][i % cols]
            for key in sorted(k for k in keys if k.startswith(f"monitor/{group}")):
                ax.plot(x, self.history[key], marker="o", markersize=3, label=key[len("monitor/") :])
            if group != "cos":
                ax.set_yscale("log")
            ax.set_title({"cos": "cosine between parts (shared trunk)"}.get(group, "gradient norm on the trunk"))
            ax.set_xlabel("round")
            ax.legend(fontsize=7)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].set_visible(False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100)
        return fig

    def __repr__(self) -> str:
        last = self.history.rounds[-1] if self.history.rounds else {}
        shown = {k: round(last[k], 6) for k in (TOTAL_KEY, f"val_{TOTAL_KEY}") if k in last}
        return (
            f"Result({self.rounds} rounds, stopped_because={self.stopped_because!r}, "
            f"best_round={self.best_round}, last={shown})"
        )


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4g}"


__all__ = ["History", "Result"]
