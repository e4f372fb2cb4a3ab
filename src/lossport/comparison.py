"""`compare`: rank balancing methods on the user's own problem, against single-task baselines.

Published rankings of balancing methods change with the data set, and careful studies (Kurin et al., NeurIPS
2022; Xin et al., NeurIPS 2022) find well-tuned equal weighting often as good as any. So lossport does not
recommend a method: it trains each candidate on each seed, trains one single-task net per task (the
baselines, shared by all methods of a seed), and reports every task metric, the average relative change
Delta-m% and the time per step.

**Delta-m%** (Maninis et al. 2019; as defined in Nash-MTL Sec. 6, CAGrad Sec. 5.2, FAMO Sec. 5.2): over the
``S`` metrics ``M_1..M_S`` of all tasks,

    Delta_m% = (1/S) sum_k (-1)^{delta_k} (M_{m,k} - M_{b,k}) / M_{b,k} * 100,

``delta_k = 1`` when higher is better (accuracy, F1), ``0`` when lower is better (MAE, RMSE, losses). Lower is
better; negative means better than single-task on average. It is a per-metric average, not per task.
Here ``M_{b,k}`` is the mean over seeds of the single-task baseline, and Delta-m% is computed for each seed of
the method, then averaged (std over seeds reported beside it).
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .metrics import higher_is_better


def delta_m(method: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Delta-m% of ``method`` against ``baseline`` over the metrics of ``baseline`` (see the module docstring)."""
    if not baseline:
        raise ValueError("delta_m needs at least one baseline metric")
    missing = [k for k in baseline if k not in method]
    if missing:
        raise ValueError(f"delta_m: the method has no value for {missing}")
    terms = []
    for k, b in baseline.items():
        if b == 0:
            raise ValueError(f"delta_m: the baseline of {k!r} is 0; the relative change is undefined")
        sign = -1.0 if higher_is_better(k) else 1.0
        terms.append(sign * (method[k] - b) / b * 100.0)
    return sum(terms) / len(terms)


@dataclass
class Row:
    """Results of one method over the seeds; ``error`` says why the method failed (then it has no results: a
    failure on any seed discards the seeds before it, whose mean would cover fewer seeds than the other rows')."""

    method: str
    metrics: dict[str, list[float]] = field(default_factory=dict)
    delta: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)
    error: str | None = None

    def mean(self, key: str) -> float:
        return statistics.fmean(self.metrics[key])

    def std(self, key: str) -> float:
        v = self.metrics[key]
        return statistics.stdev(v) if len(v) > 1 else 0.0


@dataclass
class Comparison:
    """The table of :func:`compare`: one row per method (and ``single-task``), metric means and stds."""

    rows: list[Row]
    baseline: dict[str, float]
    metric_names: list[str]

    def row(self, method: str) -> Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no method {method!r}; methods: {[r.method for r in self.rows]}")

    def table(self) -> str:
        """A plain-text table: method, Delta-m% (mean ± std), each metric (mean ± std), seconds per step; a failed
        method's row says ``failed`` and the error, listed below the table."""
        head = ["method", "delta_m%", *self.metric_names, "s/step"]
        lines = []
        for r in self.rows:
            if r.error is not None:
                lines.append([r.method, "failed", *["-"] * len(self.metric_names), "-"])
                continue
            cells = [r.method]
            cells.append(_pm(r.delta) if r.delta else "-")
            cells += [_pm(r.metrics[k]) if k in r.metrics else "-" for k in self.metric_names]
            cells.append(f"{statistics.fmean(r.seconds_per_step) * 1e3:.1f}ms" if r.seconds_per_step else "-")
            lines.append(cells)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
        arrows = ", ".join(f"{k} {'↑' if higher_is_better(k) else '↓'}" for k in self.metric_names)
        out.append(f"(delta_m%: lower is better, negative beats single-task; {arrows})")
        out += [f"{r.method} failed: {r.error}" for r in self.rows if r.error is not None]
        return "\n".join(out)

    __str__ = table

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            cols = ["method", "delta_m_mean", "delta_m_std"]
            for k in self.metric_names:
                cols += [f"{k}_mean", f"{k}_std"]
            w.writerow([*cols, "seconds_per_step", "error"])
            for r in self.rows:
                vals: list[Any] = [r.method]
                vals += [statistics.fmean(r.delta), _std(r.delta)] if r.delta else ["", ""]
                for k in self.metric_names:
                    vals += [r.mean(k), r.std(k)] if k in r.metrics else ["", ""]
                vals.append(statistics.fmean(r.seconds_per_step) if r.seconds_per_step else "")
                w.writerow([*vals, r.error or ""])

    def plot(self, pareto: tuple[str, str] | None = None):  # type: ignore[no-untyped-def]
        """A figure: Delta-m% per method with std error bars and, for two metrics ``pareto``, a scatter of
        the methods in that plane (one point per seed, the mean marked)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.delta]
        ncols = 2 if pareto else 1
        fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
        ax = axes[0] if ncols == 2 else axes
        ax.bar([r.method for r in rows], [statistics.fmean(r.delta) for r in rows], yerr=[_std(r.delta) for r in rows])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("Delta-m% (lower is better)")
        ax.tick_params(axis="x", rotation=45)
        if pareto:
            a, b = pareto
            ax2 = axes[1]
            for r in self.rows:
                if a in r.metrics and b in r.metrics:
                    pts = ax2.scatter(r.metrics[a], r.metrics[b], alpha=0.4)
                    ax2.scatter(
                        [r.mean(a)], [r.mean(b)], color=pts.get_facecolor()[0], marker="*", s=120, label=r.method
                    )
            ax2.set_xlabel(a)
            ax2.set_ylabel(b)
            ax2.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _std(v: Sequence[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _pm(v: Sequence[float]) -> str:
    m = statistics.fmean(v)
    return f"{m:.4g}±{_std(v):.2g}"


def _train_eval(
    make_net: Callable[[], nn.Module],
    data: Any,
    loss: Any,
    balance: Any,
    seed: int,
    test: Any,
    metrics: Mapping[str, Sequence[str]],
    train_kwargs: Mapping[str, Any],
) -> tuple[dict[str, float], float]:
    from .training import evaluate, train

    torch.manual_seed(seed)
    net = make_net()
    t0 = time.perf_counter()
    result = train(
        net, data, loss=loss, balance=balance, metrics=dict(metrics), seed=seed, progress=False, **train_kwargs
    )
    seconds = time.perf_counter() - t0
    steps = max(1, len(result.history.batches))
    scores = evaluate(result.net, test, loss=loss, metrics=dict(metrics))
    wanted = {f"{task}/{m}" for task, ms in metrics.items() for m in ms}
    return {k: float(v) for k, v in scores.items() if k in wanted}, seconds / steps


def _method_row(
    label: str,
    method: Any,
    seeds: Sequence[int],
    baseline: Mapping[str, float],
    run: Callable[[Any, int], tuple[dict[str, float], float]],
) -> Row:
    """One method's row over the seeds. An exception while building the balancer, training or scoring it (any
    ``Exception``: a solver giving up, a method that does not fit the problem, non-finite values) makes the row a
    failed one, with the seed and the error, and the comparison goes on with the next method."""
    row = Row(label)
    for seed in seeds:
        try:
            balance = method() if callable(method) and not isinstance(method, str) else method
            scores, sps = run(balance, seed)
            d = delta_m(scores, baseline) if baseline else None
        except Exception as e:  # reported in the row; the other methods still run
            return Row(label, error=f"seed {seed}: {type(e).__name__}: {e}")
        for k, v in scores.items():
            row.metrics.setdefault(k, []).append(v)
        row.seconds_per_step.append(sps)
        if d is not None:
            row.delta.append(d)
    return row


def compare(
    make_net: Callable[[], nn.Module],
    data: Any,
    loss: Mapping[str, Any],
    *,
    methods: Sequence[Any],
    metrics: Mapping[str, Sequence[str]],
    test: Any,
    seeds: int | Sequence[int] = 3,
    single_task: bool = True,
    **train_kwargs: Any,
) -> Comparison:
    """Train every method on every seed and the single-task baselines; evaluate all on ``test``.

    Args:
        make_net: builds a fresh net (called once per run; the seed is set before each call).
        data: training data (any form :func:`lossport.train` accepts).
        loss: a dict spec ``{task: loss}``; the single-task baseline of ``task`` trains on ``{task: loss[task]}``.
        methods: balancer names or factories (:func:`lossport.balance.available`; ``None`` for static weights).
        metrics: per task, the metrics scored on ``test`` (``{"left": ["accuracy"], "ink": ["mae"]}``).
        test: held-out data for the reported metrics.
        seeds: a count (seeds 0..n-1) or the list of seeds.
        single_task: train the baselines and report Delta-m% (otherwise only the metrics).
        **train_kwargs: passed to :func:`lossport.train` (``epochs``, ``batch_size``, ``lr``, ``validation``...).

    A method that raises on any seed gets a failed row (:attr:`Row.error`: the seed and the error) and the others
    still run; a failing single-task baseline stops the comparison (every Delta-m% needs it).
    """
    if not isinstance(loss, Mapping):
        raise ValueError("compare needs a dict loss spec {task: loss}, so that single-task baselines can be built")
    unknown = [t for t in metrics if t not in loss]
    if unknown:
        raise ValueError(f"metrics name tasks {unknown} that are not in the loss spec {list(loss)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)

    def _run(balance: Any, seed: int) -> tuple[dict[str, float], float]:
        return _train_eval(make_net, data, loss, balance, seed, test, metrics, train_kwargs)

    metric_names = [f"{t}/{m}" for t, ms in metrics.items() for m in ms]
    rows: list[Row] = []
    baseline: dict[str, float] = {}
    if single_task:
        base = Row("single-task")
        for seed in seed_list:
            for task in loss:
                task_metrics = {task: list(metrics.get(task, []))}
                if not task_metrics[task]:
                    continue
                scores, sps = _train_eval(
                    make_net, data, {task: loss[task]}, None, seed, test, task_metrics, train_kwargs
                )
                for k, v in scores.items():
                    base.metrics.setdefault(k, []).append(v)
                base.seconds_per_step.append(sps)
        baseline = {k: statistics.fmean(v) for k, v in base.metrics.items()}
        rows.append(base)
    for method in methods:
        label = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
        rows.append(_method_row(str(label if method is not None else "sum"), method, seed_list, baseline, _run))
    return Comparison(rows=rows, baseline=baseline, metric_names=metric_names)


__all__ = ["Comparison", "Row", "compare", "delta_m"]
