"""Metrics per output, accumulated over the batches of a round: accuracy, F1, MAE, RMSE and callables.

``metrics={"digit": ["accuracy", "f1"], "size": ["mae", my_fn]}`` gives history keys ``digit/accuracy``,
``digit/f1``, ``size/mae`` and ``size/my_fn`` (``val_`` in front for the validation data). Every metric
accumulates sufficient statistics over a whole data set, so the value of a round is the value over all of its
labelled examples (not a mean of per-batch values): accuracy = correct / labelled, MAE = sum |e| / n,
RMSE = sqrt(sum e^2 / n), macro F1 from the confusion counts of the whole round.

Unlabelled examples are left out exactly as in the losses: class targets equal to -100 and NaN float targets.

Outputs:

* classification with ``C > 1`` classes: output (N, C) (probabilities, logits or scores: the argmax is used),
  target (N,) class indices or (N, C) one-hot/probabilities (argmax);
* binary: output (N,) or (N, 1), predicted positive when ``output > threshold`` (0.5 for probabilities; give
  ``Accuracy(threshold=0.0)`` for logits), target 0/1 of the same number of elements;
* regression (MAE, RMSE): output and target with the same number of elements per example, every labelled
  element counts once.

A callable ``fn(output, target) -> float`` is averaged over batches weighted by the batch size (say so with
:class:`Callable` to set its name or direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable as CallableT
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import LossSpecError


class Metric:
    """A metric accumulated over batches: ``reset()``, ``update(output, target)``, ``compute() -> float``.

    ``higher_is_better`` tells early stopping and best-net selection which way is better.
    """

    name: str = "metric"
    higher_is_better: bool = False

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def fresh(self) -> Metric:
        """A new metric of the same configuration with empty statistics."""
        import copy

        m = copy.copy(self)
        m.reset()
        return m

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _class_predictions(output: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor, int]:
    """(predicted class, true class, number of classes) over the labelled examples."""
    out = output.detach()
    n = out.shape[0] if out.dim() else 1
    if out.dim() >= 2 and out.shape[1] > 1:
        classes = int(out.shape[1])
        pred = out.argmax(dim=1).reshape(n, -1)
        if target.is_floating_point() and target.dim() == out.dim() and target.shape[1] == classes:
            labelled = ~torch.isnan(target).reshape(n, classes, -1).any(dim=1).reshape(n, -1)
            true = torch.nan_to_num(target).argmax(dim=1).reshape(n, -1)
        else:
            true = target.reshape(n, -1).long()
            if true.shape != pred.shape:
                raise LossSpecError(
                    f"classification metric: output of shape {tuple(out.shape)} needs class-index targets "
                    "of shape "
                    f"{(n, *out.shape[2:])} or one-hot targets of shape {tuple(out.shape)}, got "
                    f"{tuple(target.shape)}"
                )
            labelled = true != -100
        return pred[labelled], true[labelled], classes
    flat = out.reshape(n, -1)
    t = target.reshape(n, -1) if target.dim() else target.reshape(1, 1)
    if t.shape != flat.shape:
        raise LossSpecError(
            f"binary metric: output of shape {tuple(out.shape)} and target of shape {tuple(target.shape)} "
            "differ in "
            "the number of elements per example"
        )
    if t.is_floating_point():
        labelled = ~torch.isnan(t)
        true = (t > 0.5).long()
    else:
        labelled = t != -100
        true = t.long()
    pred = (flat > threshold).long()
    return pred[labelled], true[labelled], 2


class Accuracy(Metric):
    """Fraction of labelled examples whose predicted class is the target class (see the module docstring)."""

    name = "accuracy"
    higher_is_better = True

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        pred, true, _ = _class_predictions(output, target, self.threshold)
        self.correct += int((pred == true).sum())
        self.total += int(true.numel())

    def compute(self) -> float:
        return self.correct / self.total if self.total else math.nan


class F1(Metric):
    """F1 score. Multi-class (``C > 1`` output columns): the macro average over classes of
    ``2 TP_c / (2 TP_c + FP_c + FN_c)``, over the classes that occur as prediction or target. Binary outputs:
    the F1 of the positive class."""

    name = "f1"
    higher_is_better = True

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self.confusion: Tensor | None = None
        self.binary = False

    def update(self, output: Tensor, target: Tensor) -> None:
        pred, true, classes = _class_predictions(output, target, self.threshold)
        self.binary = not (output.dim() >= 2 and output.shape[1] > 1)
        if self.confusion is None:
            self.confusion = torch.zeros(classes, classes, dtype=torch.long)
        if true.numel() and (int(true.max()) >= classes or int(true.min()) < 0):
            raise LossSpecError(f"f1: target class {int(true.max())} outside 0..{classes - 1}")
        idx = (true.cpu() * classes + pred.cpu()).reshape(-1)
        self.confusion += torch.bincount(idx, minlength=classes * classes).reshape(classes, classes)

    def compute(self) -> float:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            return math.nan
        c = self.confusion.to(torch.float64)
        tp = c.diagonal()
        fp = c.sum(0) - tp
        fn = c.sum(1) - tp
        den = 2 * tp + fp + fn
        if self.binary:
            return float(2 * tp[1] / den[1]) if float(den[1]) > 0 else 0.0
        present = den > 0
        return float((2 * tp[present] / den[present]).mean())


def _regression_errors(output: Tensor, target: Tensor) -> Tensor:
    out = output.detach()
    n = out.shape[0] if out.dim() else 1
    flat = out.reshape(n, -1).to(torch.float64)
    t = target.reshape(n, -1) if target.dim() else target.reshape(1, 1)
    if t.shape != flat.shape:
        raise LossSpecError(
            f"regression metric: output of shape {tuple(out.shape)} and target of shape "
            f"{tuple(target.shape)} "
            "differ in the number of elements per example"
        )
    t = t.to(torch.float64)
    labelled = ~torch.isnan(t)
    return (flat - t)[labelled]


class _ErrorSum(Metric):
    """Sums a power of the element errors over all labelled elements (MAE: power 1, RMSE: power 2)."""

    higher_is_better = False
    power = 1

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        e = _regression_errors(output, target).abs()
        self.sum += float((e if self.power == 1 else e**self.power).sum())
        self.count += int(e.numel())

    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan


class MAE(_ErrorSum):
    """Mean absolute error over all labelled elements."""

    name = "mae"
    power = 1

    def compute(self) -> float:
        return self.mean()


class RMSE(_ErrorSum):
    """Root mean squared error over all labelled elements."""

    name = "rmse"
    power = 2

    def compute(self) -> float:
        return math.sqrt(self.mean()) if self.count else math.nan


class Callable(Metric):
    """A function ``fn(output, target) -> float``, averaged over batches weighted by the batch size.

    ``Callable(fn, name="iou", higher_is_better=True)``; a bare function passed in ``metrics=`` is wrapped
    with its ``__name__`` and ``higher_is_better`` guessed from the name (:func:`guess_higher_is_better`).
    """

    def __init__(
        self,
        fn: CallableT[[Tensor, Tensor], Any],
        *,
        name: str | None = None,
        higher_is_better: bool | None = None,
    ) -> None:
        self.fn = fn
        self.name = str(name or getattr(fn, "__name__", "metric"))
        if self.name == "<lambda>":
            raise ValueError("a lambda used as a metric needs a name: lossport.metrics.Callable(fn, name='...')")
        self.higher_is_better = guess_higher_is_better(self.name) if higher_is_better is None else higher_is_better
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        n = int(output.shape[0]) if output.dim() else 1
        v = self.fn(output.detach(), target)
        self.sum += float(v) * n
        self.count += n

    def compute(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def __repr__(self) -> str:
        return f"Callable({self.name!r})"


BUILTIN: dict[str, type[Metric]] = {
    "accuracy": Accuracy,
    "acc": Accuracy,
    "f1": F1,
    "mae": MAE,
    "rmse": RMSE,
}

_HIGHER = ("acc", "f1", "auc", "precision", "recall", "iou", "dice", "r2", "score", "top")


def guess_higher_is_better(name: str) -> bool:
    """Metrics named like accuracy, F1, AUC, precision, recall, IoU, Dice, R2 or a score are maximised;
    everything else (losses, errors) is minimised."""
    last = name.rsplit("/", 1)[-1].lower()
    return any(h in last for h in _HIGHER)


def higher_is_better(key: str, metrics: MetricSet | None = None) -> bool:
    """The one direction rule for history keys (early stopping, the best net, comparisons): a metric's own
    ``higher_is_better`` when ``metrics`` holds it; else ``output/metric`` keys by :func:`guess_higher_is_better`;
    losses, parts, weights, balancer figures and everything else are minimised. A ``val_`` prefix is ignored."""
    base = key[4:] if key.startswith("val_") else key
    if metrics is not None:
        d = metrics.directions()
        if base in d:
            return d[base]
    if "/" in base and not base.startswith(("weight/", "balancer/", "monitor/")):
        return guess_higher_is_better(base)
    return False


def resolve(spec: Any) -> Metric:
    """A :class:`Metric` from a name (``"accuracy"``, ``"acc"``, ``"f1"``, ``"mae"``, ``"rmse"``), an
    instance, or a callable ``fn(output, target)``."""
    if isinstance(spec, Metric):
        return spec.fresh()
    if isinstance(spec, str):
        key = spec.lower()
        if key not in BUILTIN:
            raise ValueError(f"unknown metric {spec!r}; available: {', '.join(sorted(BUILTIN))} or a callable")
        m = BUILTIN[key]()
        m.name = spec
        return m
    if callable(spec):
        return Callable(spec)
    raise TypeError(f"a metric is a name, a lossport.metrics.Metric or a callable, not {type(spec).__name__}")


class MetricSet:
    """The metrics of every output, keyed ``output/metric``."""

    def __init__(self, by_output: Mapping[str, Sequence[Metric]]) -> None:
        self.by_output = {o: list(ms) for o, ms in by_output.items()}
        names = [f"{o}/{m.name}" for o, ms in self.by_output.items() for m in ms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"metric names {dup} appear twice; give them distinct names with Callable(fn, name=)")

    @property
    def keys(self) -> list[str]:
        return [f"{o}/{m.name}" for o, ms in self.by_output.items() for m in ms]

    def directions(self) -> dict[str, bool]:
        """``output/metric`` -> higher_is_better."""
        return {f"{o}/{m.name}": m.higher_is_better for o, ms in self.by_output.items() for m in ms}

    def reset(self) -> None:
        for ms in self.by_output.values():
            for m in ms:
                m.reset()

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Any]) -> None:
        for o, ms in self.by_output.items():
            if o not in outputs:
                raise LossSpecError(f"metrics were given for output {o!r}; the net's outputs are {sorted(outputs)}")
            t = targets.get(o)
            if t is None:
                raise LossSpecError(f"metrics for output {o!r} need its target under batch key {o!r}")
            if not isinstance(t, Tensor):
                t = torch.as_tensor(t)
            out = outputs[o]
            for m in ms:
                m.update(out, t)

    def compute(self) -> dict[str, float]:
        return {f"{o}/{m.name}": m.compute() for o, ms in self.by_output.items() for m in ms}


def metric_set(spec: Any, outputs: Sequence[str]) -> MetricSet | None:
    """Build the metrics of ``metrics=``: ``None``; a dict ``{output: name | callable | Metric | list}``; or,
    for a net with a single output, a name, callable, Metric or list of them."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in outputs]
        if unknown:
            raise LossSpecError(f"metrics for unknown output {unknown[0]!r}; the net's outputs are {list(outputs)}")
        items = dict(spec)
    else:
        if len(outputs) != 1:
            raise LossSpecError(
                f"metrics={spec!r} does not say which output it is for and the net has {len(outputs)} "
                "outputs "
                f"({', '.join(outputs)}); give a dict {{output: [metrics]}}"
            )
        items = {outputs[0]: spec}
    by_output: dict[str, list[Metric]] = {}
    for o, ms in items.items():
        seq: Iterable[Any] = ms if isinstance(ms, (list, tuple)) else [ms]
        by_output[o] = [resolve(m) for m in seq]
    return MetricSet(by_output)


__all__ = [
    "F1",
    "MAE",
    "RMSE",
    "Accuracy",
    "Callable",
    "Metric",
    "MetricSet",
    "guess_higher_is_better",
    "higher_is_better",
    "metric_set",
    "resolve",
]
