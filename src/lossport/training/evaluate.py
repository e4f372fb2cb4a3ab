"""`evaluate`: loss parts and metrics of a net on data, without gradients."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ..aliases import DataLike, LossSpec
from ..metrics import MetricSet, metric_set
from ..objective import Objective
from .data import Source, batch_size_of, make_source, to_device
from .progress import RoundStats
from .setup import autocast, resolve_device, resolve_precision


def as_objective(loss: LossSpec | Objective, weights: Any, balance: Any, targets: Any = None) -> Objective:
    """``loss`` itself when it is an Objective (then ``weights``/``balance``/``targets`` must be left out), else a
    new one."""
    if isinstance(loss, Objective):
        if weights is not None or balance is not None or targets is not None:
            raise ValueError(
                "weights=, balance= and targets= belong to the Objective when an Objective is given as loss"
            )
        return loss
    return Objective(loss, weights=weights, balance=balance, targets=targets)


@overload
def evaluate(
    net: nn.Module,
    data: DataLike,
    loss: LossSpec | Objective = ...,
    *,
    weights: Any = ...,
    targets: Any = ...,
    metrics: Any = ...,
    batch_size: int = ...,
    device: Any = ...,
    precision: str = ...,
    per_example: Literal[False] = ...,
) -> dict[str, float]: ...


@overload
def evaluate(
    net: nn.Module,
    data: DataLike,
    loss: LossSpec | Objective = ...,
    *,
    weights: Any = ...,
    targets: Any = ...,
    metrics: Any = ...,
    batch_size: int = ...,
    device: Any = ...,
    precision: str = ...,
    per_example: Literal[True],
) -> tuple[dict[str, float], dict[str, Tensor]]: ...


def evaluate(
    net: nn.Module,
    data: DataLike,
    loss: LossSpec | Objective = "auto",
    *,
    weights: Any = None,
    targets: Any = None,
    metrics: Any = None,
    batch_size: int = 256,
    device: Any = None,
    precision: str = "32",
    per_example: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, Tensor]]:
    """Loss parts and metrics of ``net`` on ``data``, without gradients, in eval mode (a new objective is bound in
    the net's own mode first, so a part of an output that exists only in training is absent, not an error).

    Returns floats keyed as the history: ``loss`` (the total ``sum_i s_i L_i + regularization`` with the
    static weights ``s_i`` of the spec; a balancer of an Objective given as ``loss`` is not applied), every
    part ``L_i`` (its mean over *all* labelled examples of ``data``: ``sum_b n_ib L_ib / sum_b n_ib``; a part
    with no labelled example anywhere is absent), and ``output/metric``. With ``per_example=True`` also
    returns the per-example loss of every part (a tensor of length N in data order, NaN where unlabelled;
    Wolfram's "ExampleLosses"). ``loss`` may be an :class:`~lossport.Objective`. ``device=None`` uses the
    net's device. ``data`` takes every form :func:`lossport.train` takes; ``targets`` says where each output's
    target is in a batch (:class:`~lossport.Objective`).
    """
    objective = as_objective(loss, weights, None, targets)
    dev = resolve_device(device, net)
    prec = resolve_precision(precision, dev)
    src = make_source(data, batch_size, where="data")
    out, examples = evaluate_source(net, src, objective, dev, prec, metric_spec=metrics, per_example=per_example)
    return (out, examples) if per_example else out


class _Examples:
    """Per-example losses of every part, in data order (NaN where a part is unlabelled)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Tensor]] = {}
        self.none: set[str] = set()
        self.seen = 0

    def add(self, per_example: Mapping[str, Tensor], missing: Any, parts: list[str], bs: int) -> None:
        for p in parts:
            ex = per_example.get(p)
            if ex is None and p not in missing:
                self.none.add(p)  # a part without per-example values (a scalar loss output)
                continue
            col = self.cols.setdefault(p, [torch.full((self.seen,), math.nan)] if self.seen else [])
            col.append(ex.reshape(bs, -1).float().mean(1).cpu() if ex is not None else torch.full((bs,), math.nan))
        self.seen += bs

    def result(self) -> dict[str, Tensor]:
        return {p: torch.cat(v) for p, v in self.cols.items() if v and p not in self.none}


def evaluate_source(
    net: nn.Module,
    src: Source,
    objective: Objective,
    device: torch.device,
    precision: str,
    *,
    metric_spec: Any = None,
    mset: MetricSet | None = None,
    per_example: bool = False,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """The body of :func:`evaluate` on a :class:`~lossport.training.data.Source` (also the validation of
    :func:`lossport.train`); ``mset``: a metric set to reuse, else one is built from ``metric_spec``."""
    was_training = net.training
    if not objective.compiled:  # bind in the net's own mode, so parts of training-only outputs are known
        first = next(iter(src), None)
        if first is not None:
            objective.compile(net, to_device(first, device))
    net.eval()
    if mset is not None:
        mset.reset()
    stats = RoundStats()
    extra_last: dict[str, float] = {}
    examples = _Examples()
    try:
        with torch.no_grad():
            for raw_batch in src:
                batch = to_device(raw_batch, device)
                with autocast(precision, device):
                    outputs, logits = objective.forward(net, batch)
                    losses = objective.losses(outputs, batch, net=net, logits=logits, per_example=per_example)
                if mset is None and metric_spec is not None:
                    mset = (
                        metric_spec
                        if isinstance(metric_spec, MetricSet)
                        else metric_set(metric_spec, objective.output_names)
                    )
                    if mset is not None:
                        mset.reset()
                bs = batch_size_of(batch)
                stats.add(floats(losses.parts), losses.counts, 0.0, bs, {})
                extra_last = floats(losses.extra)
                if mset is not None:
                    mset.update(outputs, objective.targets(batch))
                if per_example:
                    examples.add(losses.per_example, losses.missing, objective.part_names, bs)
    finally:
        net.train(was_training)
    out = _summary(objective, stats.part_means(), extra_last) if objective.compiled else {}
    if mset is not None:
        out.update(mset.compute())
    return out, examples.result() if per_example else {}


def _summary(objective: Objective, means: Mapping[str, float], extra: Mapping[str, float]) -> dict[str, float]:
    sw = objective.static_weights
    total = sum(sw.get(k, 1.0) * v for k, v in means.items()) + sum(extra.values())
    out: dict[str, float] = {"loss": float(total)}
    out.update({k: means[k] for k in objective.part_names if k in means})
    out.update({k: means[k] for k in means if k not in out})
    return out


def floats(d: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Python floats of scalar tensors. On an accelerator the values are stacked first so that reading them
    costs one device synchronisation; on CPU ``item()`` per value is ten times cheaper than the stack."""
    if not d:
        return {}
    keys = list(d)
    tensors = [d[k] for k in keys]
    if all(isinstance(t, Tensor) and t.device.type == "cpu" for t in tensors):
        return {k: t.item() for k, t in zip(keys, tensors)}  # type: ignore[union-attr]
    if all(isinstance(t, Tensor) for t in tensors):
        vals = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()  # type: ignore[union-attr]
    else:
        vals = [float(t.detach()) if isinstance(t, Tensor) else float(t) for t in tensors]
    return dict(zip(keys, vals))


__all__ = ["as_objective", "evaluate", "evaluate_source", "floats"]
